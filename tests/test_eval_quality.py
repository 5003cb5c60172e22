"""Quality evaluation: metric functions on hand-made inputs, the HumanEval sandbox, judge
perplexity against a direct computation, block NLL, and ``eval quality`` end to end on tiny
random models (vocabulary and tokenizer of SmolLM2, so real prompts encode)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import backbone_from_hf, hf_model

from twotower.cli import main
from twotower.eval import humaneval, metrics
from twotower.eval.block_nll import block_nll
from twotower.eval.judge import Judge
from twotower.eval.quality import aggregate, retention
from twotower.generate.prompts import load_prompt_set
from twotower.model.twotower import DenoiserConfig, TwoTower


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A tiny random Llama backbone and a differently seeded tiny judge, saved with the SmolLM2 tokenizer."""
    from transformers import AutoTokenizer

    from twotower.checkpoints import checkpoint_dir

    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir("smollm2-135m"))
    root = tmp_path_factory.mktemp("tiny")
    dirs = {}
    for name, seed in (("model", 0), ("judge", 1)):
        model = hf_model("llama", seed=seed, vocab_size=49152, max_position_embeddings=1024)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


def test_agreement_distinct_repetition():
    ref = [1, 2, 3, 4]
    assert metrics.token_agreement([1, 2, 9, 4], ref) == 0.75
    assert metrics.token_agreement([1, 2], ref) == 0.5  # missing positions disagree
    assert metrics.prefix_agreement([1, 2, 9, 4], ref) == 2
    assert metrics.exact_match(ref, list(ref)) and not metrics.exact_match([1, 2, 3], ref)
    assert metrics.distinct_n([5, 5, 5, 5], 2) == 1 / 3
    assert metrics.distinct_n([1, 2, 3, 4], 2) == 1.0
    assert metrics.repetition_rate([1, 2, 1, 2, 1, 2], n=2) == 3 / 5


def test_retention_orientation_and_aggregate():
    ar = {"token_agreement": 1.0, "exact_match": 1.0, "distinct_2": 0.8, "repetition_rate": 0.0,
          "judge_perplexity": 10.0, "humaneval_pass_at_1": 0.5}
    diff = {"token_agreement": 0.5, "exact_match": 0.0, "distinct_2": 0.4, "repetition_rate": 0.5,
            "judge_perplexity": 20.0, "humaneval_pass_at_1": 0.25,
            "block_nll": {"t1": {"ar_nll": 2.0, "diffusion_nll": 8.0}}}
    ret = retention(diff, ar)
    assert ret["judge_perplexity"] == 0.5 and ret["block_nll_t1"] == 0.25  # AR / diffusion: higher is better
    assert ret["distinct_2"] == 0.5 and ret["non_repetition"] == 0.5 and ret["humaneval_pass_at_1"] == 0.5
    assert aggregate(ret) == pytest.approx(0.5)  # the decoded text's metrics; block NLL is reported beside
    # text identical to AR's (verified decoding) retains everything, whatever the denoiser's block NLL
    same = {**ar, "block_nll": diff["block_nll"]}
    assert aggregate(retention(same, ar)) == pytest.approx(1.0)
    ar["humaneval_pass_at_1"] = 0.0  # undefined ratio: left out, not counted as a loss
    assert retention(diff, ar)["humaneval_pass_at_1"] is None


def test_humaneval_sandbox_pass_and_fail():
    problem = humaneval.load_problems(1)[0]
    good = humaneval.check_completion(problem, problem["canonical_solution"])
    wrong = humaneval.check_completion(problem, "    return False\n")
    network = humaneval.check_completion(problem, "    import socket\n    socket.create_connection(('example.com', 80))\n")
    endless = humaneval.check_completion(problem, "    while True:\n        pass\n", timeout=1.0)
    assert good.passed and not wrong.passed and "AssertionError" in wrong.result
    assert not network.passed and "network access is disabled" in network.result
    assert not endless.passed and endless.result == "timed out"
    assert humaneval.pass_at_1([good, wrong]) == 0.5
    assert humaneval.truncate_completion("    return 1\n\ndef other():\n    pass") == "    return 1\n"


def test_judge_perplexity_matches_direct_computation(tiny_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    judge = Judge(str(tiny_dirs["judge"]))
    prompts, conts = ["The weather today", "Once upon a time"], [" is sunny and warm.", " there was a fox."]
    score = judge.corpus(prompts, conts)

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["judge"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny_dirs["judge"])
    nll, count = 0.0, 0
    for p, c in zip(prompts, conts):
        prefix = tok(p, add_special_tokens=False).input_ids
        if tok.bos_token_id is not None:
            prefix = [tok.bos_token_id] + prefix
        target = tok(c, add_special_tokens=False).input_ids
        with torch.no_grad():
            logp = model(torch.tensor([prefix + target])).logits[0].log_softmax(-1)
        nll -= sum(float(logp[len(prefix) - 1 + i, tid]) for i, tid in enumerate(target))
        count += len(target)
    assert score.tokens == count
    assert score.perplexity == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_block_nll_bound_and_ar_reference():
    model = TwoTower(backbone_from_hf(hf_model("llama")), DenoiserConfig(flavour="lora", block_size=4))
    windows = [list(range(3, 36)), list(range(40, 73))]  # 33 tokens: 8 blocks of 4 shifted targets each
    full = block_nll(model, windows, block_size=4, t=1.0)
    assert full.tokens == 2 * 8 * 4  # at t = 1 every target is hidden

    ids = torch.tensor(windows)
    logits = model.context_forward(ids)[:, :32]
    ar = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:33].flatten())
    assert full.ar_nll == pytest.approx(float(ar), rel=1e-5)
    # block size 1 is mock-AR: the identity-initialised denoiser reproduces the AR model exactly
    mock = block_nll(model, windows, block_size=1, t=1.0)
    assert mock.diffusion_nll == pytest.approx(mock.ar_nll, rel=1e-4)
    half = block_nll(model, windows, block_size=4, t=0.5, seed=0)
    assert 0 < half.tokens < full.tokens and math.isfinite(half.diffusion_nll)


def test_prompt_set_shipped_and_rejects_bad(tmp_path):
    rows = load_prompt_set()
    assert len(rows) >= 8 and all(r["text"] and r["kind"] for r in rows)
    assert load_prompt_set(count=3) == rows[:3]
    bad = tmp_path / "bad.jsonl"
    for text, message in [('{"kind": "prose"}\n', ":1: no \"text\""), ('{"text": "a"}\n{oops\n', ":2: invalid JSON"),
                          ('["text"]\n', ":1: no"), ('{"text": "  "}\n', ":1: no")]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_prompt_set(bad)
    for count in (0, len(rows) + 1):
        with pytest.raises(ValueError, match=f"between 1 and {len(rows)}"):
            load_prompt_set(count=count)


def test_eval_quality_end_to_end(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "quality"
    code = main([
        "eval", "quality", "--model", str(tiny_dirs["model"]), "--judge", str(tiny_dirs["judge"]),
        "--prompts", "3", "--max-new-tokens", "8", "--thresholds", "0.5", "0.9", "--block-sizes", "4",
        "--humaneval-problems", "1", "--humaneval-max-new-tokens", "12", "--nll-window", "64",
        "--nll-t", "1.0", "--output-dir", str(out), "--threads", "1",
    ])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "untrained denoiser" in captured.err
    report = json.loads((out / "quality.json").read_text())
    assert [(r["block_size"], r["threshold"]) for r in report["diffusion"]] == [(4, 0.5), (4, 0.9)]
    assert len(report["ar"]["continuations"]) == 3 and report["ar"]["judge_perplexity"] > 1
    for r in report["diffusion"]:
        assert 0 <= r["metrics"]["token_agreement"] <= 1
        assert r["metrics"]["block_nll"]["t1"]["tokens"] > 0
        assert len(r["humaneval"]) == 1 and r["retention"]["judge_perplexity"] > 0
    table = (out / "quality.md").read_text()
    assert "| 4 | 0.9 |" in table and "retention" in table


def test_eval_quality_one_step_per_block_runs_one_threshold(tiny_dirs, tmp_path):
    """With one step per block the whole block is drafted at once, so the threshold plays no
    part: verified whole-block drafts are decoded once, shown without a threshold, and equal AR."""
    out = tmp_path / "drafts"
    code = main(["eval", "quality", "--model", str(tiny_dirs["model"]), "--judge", "none", "--prompts", "2",
                 "--max-new-tokens", "8", "--thresholds", "0.5", "0.9", "--block-sizes", "4",
                 "--humaneval-problems", "0", "--nll-window", "64", "--nll-t", "1.0", "--verify",
                 "--steps-per-block", "1", "--output-dir", str(out), "--threads", "1"])
    assert code == 0
    report = json.loads((out / "quality.json").read_text())
    (row,) = report["diffusion"]
    assert row["metrics"]["exact_match"] == 1.0
    assert "| 4 | – |" in (out / "quality.md").read_text()


TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: {output_type}
doc_to_text: "{{{{question}}}}"
"""


def test_lm_eval_local_jsonl_tasks_offline(tiny_dirs, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from twotower.eval.lm_eval_model import TwoTowerLM

    data = tmp_path / "qa.jsonl"
    docs = [{"question": "Q: What colour is the sky?\nA:", "answer": " blue", "choices": [" blue", " green"], "label": 0},
            {"question": "Q: How many legs has a cat?\nA:", "answer": " four", "choices": [" two", " four"], "label": 1}]
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    common = dict(data=data, cache=tmp_path / "hf_cache")
    (tasks / "mc.yaml").write_text(TASK_YAML.format(name="tiny_mc", output_type="multiple_choice", **common)
                                   + 'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
                                   + "metric_list:\n  - metric: acc\n")
    (tasks / "gen.yaml").write_text(TASK_YAML.format(name="tiny_gen", output_type="generate_until", **common)
                                    + 'doc_to_target: "{{answer}}"\n'
                                    + "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 6\n"
                                    + "metric_list:\n  - metric: exact_match\n")
    lm = TwoTowerLM(pretrained=str(tiny_dirs["model"]), mode="mask_diffusion", block_size=4, confidence_threshold=0.5)
    results = simple_evaluate(model=lm, tasks=["tiny_mc", "tiny_gen"], task_manager=TaskManager(include_path=str(tasks)))
    assert 0.0 <= results["results"]["tiny_mc"]["acc,none"] <= 1.0
    assert 0.0 <= results["results"]["tiny_gen"]["exact_match,none"] <= 1.0

    # loglikelihood is the AR model's: log p(continuation | context) under the context tower
    (score, _), = lm.loglikelihood([_Request(("Q: What colour", " is the sky"))])
    ctx, target = lm._encode("Q: What colour"), lm._encode(" is the sky")
    ids = torch.tensor([[lm.prefix_token] + ctx + target])
    logp = lm.model.context_forward(ids)[0, :-1].log_softmax(-1)
    direct = sum(float(logp[len(ctx) + i, tok]) for i, tok in enumerate(target))
    assert score == pytest.approx(direct, rel=1e-5)


class _Request:
    def __init__(self, args):
        self.args = args
