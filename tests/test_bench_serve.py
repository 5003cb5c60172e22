"""``twotower bench serve`` end to end on a tiny model: a real server process under concurrent
streaming clients, JSON, table and plot; the recommended (verified) preset's texts are AR's."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")


def test_bench_serve_writes_json_table_and_plot(world, tmp_path):
    from twotower.bench.serve import run_serve_bench

    out = tmp_path / "serve"
    results = run_serve_bench(model=str(world.tt), dtype="float32", concurrency=[1, 3], requests=3, max_tokens=6,
                              max_batch=4, threads=1, output_dir=str(out))
    saved = json.loads((out / "serve.json").read_text())
    assert saved["levels"].keys() == {"ar", "recommended"}
    for name in ("ar", "recommended"):
        levels = saved["levels"][name]
        assert [lv["concurrency"] for lv in levels] == [1, 3] and all(lv["requests"] == 3 for lv in levels)
        for lv in levels:
            assert lv["tokens"] > 0 and lv["tokens_per_s"] > 0 and lv["ttft_p50"] <= lv["ttft_p90"]
    for lv in saved["levels"]["recommended"]:
        assert lv["same_text_as_ar"] == 1.0 and lv["speedup_vs_ar"] > 0  # verified drafts: AR's text
    assert saved["box"]["threads"] == 1 and "cpu_flags" in saved["box"]
    table = (out / "serve.md").read_text()
    assert table.count("| recommended |") == 2 and "llama.cpp" in table
    assert (out / "serve.png").stat().st_size > 1000
    assert results["max_batch"] == 4


def test_the_served_contender_gets_the_model_options_it_was_asked_for():
    """`bench serve --quantize int4 --compile --no-exact` measures a server started with them (it once
    started a plain float32 eager one whatever was asked)."""
    from twotower.bench.serve import server_command
    from twotower.cli import build_parser

    command = server_command("smollm2-135m", "auto", 8123, 4, 2, exact=False, quantize="int4", compile=True,
                             untrained_denoiser=True)
    assert command[1:4] == ["-m", "twotower.cli", "serve"]
    served = build_parser().parse_args(command[3:])
    assert (served.model, served.dtype, served.quantize, served.compile, served.exact, served.untrained_denoiser,
            served.port, served.max_batch, served.threads) == ("smollm2-135m", "auto", "int4", True, False, True,
                                                               8123, 4, 2)
    plain = build_parser().parse_args(server_command("m", "float32", 1, 1, 1)[3:])
    assert (plain.quantize, plain.compile, plain.exact, plain.untrained_denoiser) == ("none", False, True, False)
