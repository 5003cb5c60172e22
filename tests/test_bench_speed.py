"""``bench speed``: token and NFE counting against a tiny random model's known outputs, the
interleaved timing harness on workloads of known cost, and the command end to end."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
from tiny_models import attention_config, backbone_from_hf, hf_model, tiny_backbone

from twotower.bench.decoders import Decoded, ForwardCounter, counted, ours, transformers_decoder
from twotower.bench.report import markdown, pareto_frontier
from twotower.bench.speed import Contender, batches_of, summarise
from twotower.bench.timing import interleaved
from twotower.cli import main
from twotower.generate import DecodingSettings, generate_ar
from twotower.generate.ar import shape_rows
from twotower.generate.prompts import load_prompt_set
from twotower.model.twotower import DenoiserConfig, TwoTower

PROMPTS = [[5, 9, 17, 33, 4], [8, 3, 21]]


@pytest.fixture(scope="module")
def backbone():
    return tiny_backbone(attention_config())


def one_pass(decode, batches) -> Contender:
    c = Contender("x", {}, decode, batches)
    c()
    c.kept, c.seconds = c._passes, [1.0]
    return c


def test_counted_stops_after_first_eos():
    assert counted([4, 7, 2, 9, 2], {2}) == [4, 7, 2]
    assert counted([4, 7, 9], {2}) == [4, 7, 9]
    assert counted([], {2}) == []


def test_prompt_and_post_eos_tokens_never_count(backbone):
    known = generate_ar(backbone, PROMPTS, max_new_tokens=12, eos_token_id=[]).tokens
    # make a token the first row generates (but not at its start) the EOS: the harness must count
    # that row up to and including its first occurrence and nothing after, the prompt never
    stop = known[0][4]
    cut = known[0].index(stop) + 1
    expected = [known[0][:cut], counted(known[1], {stop})]
    decode = ours(backbone, DecodingSettings(mode="ar", max_new_tokens=12, stop_token_ids=[stop]), {stop})
    c = one_pass(decode, [PROMPTS])
    assert c.kept[0].tokens == expected
    row = summarise(c, 1.0, expected)
    assert row["generated_tokens"] == sum(map(len, expected))
    assert row["token_agreement"] == 1.0 and row["exact_match"] == 1.0
    # AR: one forward per position of the longest row (the prompt pass yields the first token)
    assert row["nfe_per_token"] == 1.0


def test_transformers_baseline_counts_only_generated_tokens():
    hf = hf_model("llama")
    ours_ar = generate_ar(backbone_from_hf(hf), PROMPTS, max_new_tokens=6, eos_token_id=[]).tokens
    forwards = ForwardCounter(hf)
    # an EOS id the model never produces: every row runs to max_new_tokens
    decode = transformers_decoder(hf, forwards, {255}, pad=0, max_new_tokens=6)
    out = decode(PROMPTS)
    assert out.tokens == [counted(r, {255}) for r in ours_ar]  # the left-padded prompt is stripped
    assert out.nfe == 6  # prefill + 5 cached steps, one forward each


def test_nfe_counts_each_denoiser_forward_once(backbone):
    model = TwoTower(backbone, DenoiserConfig(block_size=4)).eval()
    calls = []
    forward = model.denoise_block
    model.denoise_block = lambda *a, **k: calls.append(1) or forward(*a, **k)
    settings = DecodingSettings(max_new_tokens=10, block_size=4, confidence_threshold=0.5, stop_token_ids=[])
    decode = ours(model, settings, set())
    c = one_pass(decode, batches_of(PROMPTS, 1))
    p = c.kept[0]
    assert p.nfe == len(calls) > 0
    assert p.longest_rows == 20  # two requests of 10 tokens, one batch each
    assert summarise(c, 1.0, p.tokens)["nfe_per_token"] == len(calls) / 20


def test_speedup_is_a_generated_throughput_ratio():
    """A mode that stops early must not look fast: half the wall time for half the tokens is
    no speed-up."""
    c = one_pass(lambda batch: Decoded([[7, 2]], 2), [[[1, 3]]])
    row = summarise(c, 2.0, [[5, 6, 7, 2]], ar_seconds=[2 * c.seconds[0]])
    assert row["wall_time_ratio_vs_ar"] == 2.0 and row["speedup_vs_ar"] == 1.0
    assert row["speedup_per_round"] == [1.0]  # each round: AR's time over the mode's, per token
    assert row["ar_tokens_per_second_beside"] == 4 / (2 * c.seconds[0])
    assert row["token_agreement"] == 0.0 and row["generated_tokens"] == 2


def test_batches_are_filled_by_cycling_the_prompts():
    assert batches_of([[1], [2], [3]], 2) == [[[1], [2]], [[3], [1]]]
    assert batches_of([[1], [2]], 4) == [[[1], [2], [1], [2]]]


def test_interleaved_ratio_on_a_fake_clock_with_drift():
    """Costs 1 and 2.5 units while the machine slows down round after round (alike for both,
    as interleaving assumes): the reported ratio is exact, the warm-up round is dropped."""
    now = [0.0]
    rounds = [0]

    def work(cost):
        def fn():
            now[0] += cost * (1 + 0.3 * rounds[0]) * (5 if rounds[0] == 0 else 1)  # slow first round
        return fn

    t = interleaved({"a": work(1.0), "b": work(2.5)}, repeats=5, warmup=1, clock=lambda: now[0],
                    on_round=lambda r: rounds.__setitem__(0, r + 1))
    assert len(t.seconds["a"]) == 5
    assert t.ratio("b", "a") == pytest.approx(2.5)
    assert t.median("a") == pytest.approx(1.0 * (1 + 0.3 * 3))


def test_interleaved_ratio_with_real_sleeps():
    t = interleaved({"fast": lambda: time.sleep(0.01), "slow": lambda: time.sleep(0.03)}, repeats=3)
    assert t.ratio("slow", "fast") == pytest.approx(3.0, rel=0.3)


def test_pareto_frontier():
    points = [(100.0, 1.0), (90.0, 2.0), (80.0, 1.5), (90.0, 1.0), (70.0, 3.0)]
    assert pareto_frontier(points) == [4, 1, 0]


PEAK_SCRIPT = """
import json, torch
from twotower.bench.memory import PeakMemory
with PeakMemory() as mem:
    x = torch.ones(256 * 2**20 // 4)  # 256 MiB, touched
    del x
print(json.dumps({"exact": PeakMemory.exact, "over": mem.over_start_mb, "peak": mem.peak_mb}))
"""


def test_peak_memory_sees_torch_allocations():
    # a fresh process: in this one, memory that earlier tests freed may stay resident (allocator
    # caches, heap pages kept), and a new allocation can reuse it without raising the peak
    r = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    mem = json.loads(r.stdout.splitlines()[-1])
    if mem["exact"]:
        assert 200 < mem["over"] < 1024
    assert mem["peak"] > 0


def test_prompts_are_varied():
    prompts = load_prompt_set()
    assert len(prompts) == 16
    assert {"prose", "dialogue", "code", "list"} <= {p["kind"] for p in prompts}
    assert len({p["kind"] for p in prompts[:4]}) == 4  # --prompts 4 already mixes the kinds


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama in transformers format with the SmolLM2 tokenizer (chat template),
    so that the transformers baselines and the chat-templated prompts run as on the real model."""
    from twotower.checkpoints import CheckpointError, checkpoint_dir

    try:
        source = checkpoint_dir("smollm2-135m")
    except CheckpointError as e:
        pytest.skip(f"needs the default model's tokenizer: {e}")
    out = tmp_path_factory.mktemp("tiny-llama")
    hf = hf_model("llama", vocab_size=49152, hidden_size=16, intermediate_size=32, head_dim=4,
                  max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                  pad_token_id=2)
    hf.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copy(source / name, out / name)
    return out


def test_bench_speed_end_to_end(tiny_dir, tmp_path, capsys):
    out = tmp_path / "speed"
    code = main(["bench", "speed", "--model", str(tiny_dir), "--threads", "1", "--thresholds", "0.5", "0.9",
                 "--block-sizes", "4", "--batch-sizes", "1", "2", "--prompts", "2", "--max-new-tokens", "6",
                 "--repeats", "2", "--output-dir", str(out)])
    assert code == 0
    assert "untrained denoiser" in capsys.readouterr().err
    data = json.loads((out / "speed.json").read_text())
    runs = {(r["batch_size"], r["label"]): r for r in data["runs"]}
    dials = {"mask_diffusion S=4 t=0.5", "mask_diffusion S=4 t=0.9"}
    labels = {"ar", "mock_ar", "transformers"} | dials | {f"{d} fused" for d in dials}  # fused twins: lora
    assert {(1, x) for x in labels | {"prompt_lookup"}} | {(2, x) for x in labels} == set(runs)
    for batch in (1, 2):  # the fused dial is the dial, with a forward fewer a block
        for d in dials:
            plain, fused = runs[(batch, d)], runs[(batch, f"{d} fused")]
            assert fused["tokens"] == plain["tokens"] and fused["forwards_per_token"] < plain["forwards_per_token"]
    assert any("prompt_lookup at batch 2" in s for s in data["skipped"])
    for r in data["runs"]:
        # repeats only, the warm-up round dropped; our AR ran beside every other contender
        pairs = sum(1 for b, _ in runs if b == r["batch_size"]) - 1
        assert len(r["seconds"]) == 2 * (pairs if r["mode"] == "ar" else 1)
        assert r["tokens_per_second"] > 0 and r["latency_s"]["p90"] >= r["latency_s"]["median"] > 0
        # each round's speed-up, and our AR's speed in the rounds beside this contender
        assert len(r["speedup_per_round"]) == len(r["seconds"]) and r["ar_tokens_per_second_beside"] > 0
        assert min(r["speedup_per_round"]) - 1e-9 <= r["speedup_vs_ar"] <= max(r["speedup_per_round"]) + 1e-9
        assert r["requests"] == 2 and 0 < r["generated_tokens"] <= 2 * 6
    ar = runs[(1, "ar")]
    assert ar["speedup_vs_ar"] == 1.0 and ar["nfe_per_token"] == 1.0
    # same weights, greedy: transformers and the identity denoiser's mock-AR reproduce our AR
    for label in ("transformers", "prompt_lookup", "mock_ar"):
        assert runs[(1, label)]["exact_match"] == 1.0, label
        assert runs[(1, label)]["generated_tokens"] == ar["generated_tokens"]
    assert data["box"]["dtype"] == "float32" and data["box"]["threads"] == 1
    assert data["prompts"]["chat_template"] is True
    table = (out / "speed.md").read_text()
    assert "| 1 | mask_diffusion | 4 | 0.9 |" in table and "speed-up vs AR" in table
    assert "commit rule: threshold" in table and runs[(1, "mask_diffusion S=4 t=0.9")]["commit_rule"] == "threshold"
    assert (out / "speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # on the CPU memory is RSS; a GPU run reports the CUDA allocator's peak instead
    assert data["box"]["device"] == "cpu" and all(r["peak_gpu_mb"] is None for r in data["runs"])
    gpu = {**data, "box": {**data["box"], "device": "cuda", "cuda": "NVIDIA H100"},
           "runs": [{**r, "peak_gpu_mb": 123.0} for r in data["runs"]]}
    table = markdown(gpu)
    assert "peak GPU mem (MB)" in table and "| 123 |" in table and "device cuda (NVIDIA H100)" in table


def test_bench_speed_verified_drafting_reproduces_ar(tiny_dir, tmp_path):
    """--verify --steps-per-block 1: the denoiser drafts each block in one forward and the
    context tower keeps the agreeing prefix, so the output is our AR's, token for token. The
    threshold plays no part then: two of them make one run, shown without a threshold."""
    out = tmp_path / "verified"
    code = main(["bench", "speed", "--model", str(tiny_dir), "--threads", "1", "--modes", "mask_diffusion", "fused",
                 "--thresholds", "0.9", "0.5", "--block-sizes", "4", "--batch-sizes", "1", "--prompts", "2",
                 "--max-new-tokens", "8", "--repeats", "1", "--verify", "--steps-per-block", "1",
                 "--tree-nodes", "0", "3", "--output-dir", str(out)])
    assert code == 0
    data = json.loads((out / "speed.json").read_text())
    diffusion, tree, fused = [r for r in data["runs"] if r["mode"] == "mask_diffusion"]  # trees have no fused twin
    # a tree of 3 drafts: one denoiser forward and one tree pass of 4 rows a step, the same output
    assert tree["label"] == "mask_diffusion S=4 verified tree=3" and tree["tree_nodes"] == 3
    assert tree["exact_match"] == 1.0 and set(tree["forward_shapes"]) == {"denoiser 4", "tree 4"}
    # the threshold plays no part with one step per block: it is not in the label
    assert diffusion["label"] == "mask_diffusion S=4 verified" and diffusion["steps_per_block"] == 1
    assert diffusion["exact_match"] == 1.0 and diffusion["verify"] is True
    # the fused twin: one forward a step, both towers' rows in it, the same output
    assert fused["label"] == "mask_diffusion S=4 verified fused" and fused["fused"] is True and fused["exact_match"] == 1.0
    assert fused["forwards_per_token"] == fused["nfe_per_token"]
    assert diffusion["forwards_per_token"] > diffusion["nfe_per_token"]  # a draft forward and a check a step
    assert {s.split()[0] for s in diffusion["forward_shapes"]} == {"denoiser", "context"}
    assert {s.split()[0] for s in fused["forward_shapes"]} == {"fused"}
    for r in (diffusion, fused):
        forwards = sum(r["forward_shapes"].values())
        rows = sum(shape_rows(s) * n for s, n in r["forward_shapes"].items()) / forwards
        assert r["rows_per_forward"] == pytest.approx(rows) and r["predicted_speedup"] > 0
        # a forward costs one AR step up to 64 rows: the prediction is tokens per forward
        assert r["predicted_speedup_flat64"] == pytest.approx(r["generated_tokens"] / forwards)
    shapes = {s for r in (diffusion, tree, fused) for s in r["forward_shapes"]}
    assert set(data["cost_model"]["forward_ms"]) == shapes | {"context 1"}
    assert data["cost_model"]["relative_to_ar_step"]["context 1"] == 1.0
    table = (out / "speed.md").read_text()
    assert "verified against the context tower, 1 denoiser step(s) per block" in table
    assert "| 1 | mask_diffusion verified tree of 3 | 4 | – |" in table
    assert "| 1 | mask_diffusion verified | 4 | – |" in table and "| 1 | mask_diffusion fused | 4 | – |" in table
    assert "Cost model" in table
