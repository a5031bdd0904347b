"""What tests share besides fixtures: the micro presets and a seconds-long extract configuration.

The micro teacher (`test_mae_micro_patch16`) and student run the real code path at 64-px crops
(L = 16 patches, T = 17 tokens, D = 32), so a whole extract or a few training steps take seconds.
"""
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from g2sd_cache.generic.extract import ExtractConfig

MICRO_TEACHER = "test_mae_micro_patch16"
MICRO_STUDENT = "test_vit_micro_patch16_dec32d1b"


def micro_extract_config(data, out, **overrides) -> ExtractConfig:
    """An extract configuration that runs in seconds on CPU: micro teacher, 64-px crops, no workers."""
    base = dict(data=str(data), out=str(out), teacher="random", arch=MICRO_TEACHER, img_size=64, views=2,
                shard_size=8, chunk_views=2, batch_size=4, workers=0, device="cpu")
    base.update(overrides)
    return ExtractConfig(**base)


def sigterm_after_first_record(argv: list[str], run: Path, env: dict | None = None) -> tuple[int, str, str]:
    """Run `g2sd-cache ARGV` writing to run folder `run`, send it SIGTERM once its metrics.jsonl holds a record
    (a preemption notice mid-run), and return (exit status, stdout, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "g2sd_cache.cli.main", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip():
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def free_port() -> int:
    """A TCP port on 127.0.0.1 the OS reports free now: fixed ports collide when two suites run at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
