"""The command line: one parser per command (defaults read from the config dataclasses), the demo and
export. Imported by nothing but the console-script entry point and the tests.
"""
