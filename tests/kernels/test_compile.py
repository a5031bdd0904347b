"""GPU readiness without a GPU: every variant of the fused loss kernels the trainer can launch compiles for
sm_80 (A100) and sm_90 (H100/H200) with the ptxas shipped in the triton wheel (g2sd_cache.kernels.compile_check).

294 variants (pred dtype x target codec incl. int4 x mask/no-mask x grad/no-grad x the trainer's launch
config for D = 512 and 768, per arch; fp8 as each arch launches it; the backward per pred dtype), ~0.21 s
of CPU each: about 35 s on two idle cores, hence `slow`. It runs in a subprocess with TRITON_INTERPRET=0,
because the interpreter (on for every other test) turns the kernels into Python functions. The variants the
trainer never launches (fp32 gradient buffer, tiles for inputs under 8 rows) compile with `--all`.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.mark.slow
def test_every_trainer_kernel_variant_compiles_for_sm80_and_sm90(tmp_path):
    out = tmp_path / "compiled.json"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    jobs = str(max(1, min(4, os.cpu_count() or 1)))
    proc = subprocess.run([sys.executable, "-m", "g2sd_cache.kernels.compile_check", "--arch", "80", "90",
                           "--jobs", jobs, "--json", str(out)], env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"a kernel variant does not compile:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    results = json.loads(out.read_text())["variants"]
    labels = [r["label"] for r in results]
    assert len(labels) == len(set(labels)) == 294
    for arch in (80, 90):
        mine = [r for r in results if r["label"].startswith(f"sm_{arch} ")]
        assert len(mine) == 147
        for target in ("fp32", "bf16", "fp16", "int8", "fp8", "int4"):
            # 3 pred dtypes x mask / no mask x grad / no grad x D = 512 and 768
            assert sum(f"target={target} " in r["label"] for r in mine) == 24, target
    for r in results:
        assert r["cubin_bytes"] > 0 and r["registers"] is not None, r
        # the block-size rule promises tiles that fit in registers: no variant spills to local memory
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert r["registers"] <= 255 and r["shared"] <= 48 * 1024, r
