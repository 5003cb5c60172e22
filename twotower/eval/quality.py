"""``twotower eval quality``: what mask diffusion costs in quality, against AR on the same model.

On the shipped prompt set (twotower/bench/prompts.jsonl, the one ``bench speed`` uses), for
every (block size, confidence threshold) setting of the dial:
  * greedy agreement with the AR continuation (token-level, common prefix, whole continuation);
  * judge perplexity of the continuations under an independent model, next to the AR
    continuations' judge perplexity, with distinct-2 and 4-gram repetition for degenerate text;
  * teacher-forced block NLL on held-out text (the diffusion bound) vs the AR NLL;
  * HumanEval pass@1, AR vs diffusion.
Retention = diffusion / AR for each metric, oriented so that higher is better (AR / diffusion
for perplexity and NLL); the aggregate is the geometric mean of those that measure the decoded
text. Written as JSON and Markdown.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from statistics import mean

from tqdm import tqdm

from ..checkpoints import DEFAULT_MODEL
from ..checkpoints.two_tower import load_model, warn_untrained
from ..errors import UsageError
from ..files import atomic_write, prepare_output_dir
from ..generate import DecodingSettings, decode, resolve_settings
from ..generate.prompts import PROMPT_SET, encode_prompt, load_prompt_set
from ..generate.settings import settings_grid
from ..model.twotower import TwoTower
from . import block_nll, humaneval, metrics
from .judge import DEFAULT_JUDGE, Judge

# The retentions that measure the decoded text itself. Agreement with AR is reported but not
# folded in, since a different continuation can be just as good. Nor is the block NLL: it scores
# the denoiser's one-step prediction of a whole block, is the same at every setting of the dial,
# and would rate verified decoding, whose output *is* AR's, below 100%.
AGGREGATED = ("judge_perplexity", "distinct_2", "non_repetition", "humaneval_pass_at_1")


@dataclass
class QualitySettings:
    model: str = DEFAULT_MODEL
    dtype: str = "float32"
    device: str = "cpu"  # where the model runs (the judge stays on the CPU)
    untrained: bool = False  # a registry model without its shipped denoiser
    exact: bool = True  # batch- and shape-invariant inference (model/exact.py)
    quantize: str = "none"  # weight-only int8 / int4 of both towers (model/quant.py)
    quantize_drafter: str | None = None  # the denoiser tower's own (None: quantize's)
    compile: bool = False  # decoding passes through torch.compile (model/compiled.py)
    prompts_file: str = str(PROMPT_SET)
    prompts: int | None = None  # the first N prompts; None: all
    chat: bool = True  # wrap prompts in the chat template when the tokenizer has one
    # the dial, by the one rule of resolve_settings: with none of thresholds, verify and
    # steps_per_block given, the model's recommended preset (at each block size given)
    thresholds: list[float] | None = None
    block_sizes: list[int] | None = None  # None: the model's (or its preset's)
    steps_per_block: int | None = None
    commit_rule: str | None = None  # None: the model's recommendation, else the released rule
    verify: bool | None = None
    fused: bool | None = None  # with verify: one forward of both towers per step (the same output)
    tree_nodes: list[int] | None = None  # verified tree drafts of each of these sizes (0: a chain)
    max_new_tokens: int = 64
    batch_size: int = 8
    judge: str | None = DEFAULT_JUDGE  # None: skip judge perplexity
    nll_t: list[float] = field(default_factory=lambda: [1.0, 0.5])
    nll_window: int = 256
    heldout: str = str(block_nll.HELDOUT)
    humaneval_problems: int | None = None  # None: all 164; 0: skip
    humaneval_max_new_tokens: int = 256
    output_dir: str = "bench_results/quality"


def _batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def decode_all(model: TwoTower, prompts: list[list[int]], settings: DecodingSettings, batch_size: int,
               desc: str) -> tuple[list[list[int]], float]:
    """Continuations (EOS excluded) for every prompt with ``settings``. Returns them and the
    tokens per NFE."""
    tokens: list[list[int]] = []
    nfe = new = 0
    eos = set(model.context.config.eos_token_ids)
    for batch in tqdm(_batches(prompts, batch_size), desc=desc, leave=False, file=sys.stderr):
        out = decode(model, batch, settings)
        tokens += [row[:-1] if row and row[-1] in eos else row for row in out.tokens]
        # per-row passes: a batched forward is one NFE for each row in it, so batching never inflates this
        nfe, new = nfe + sum(out.stats.row_nfe), new + out.stats.total_new_tokens
    return tokens, (new / nfe if nfe else 0.0)


def text_metrics(candidates: list[list[int]], references: list[list[int]]) -> dict:
    return {
        "token_agreement": mean(metrics.token_agreement(c, r) for c, r in zip(candidates, references)),
        "prefix_agreement": mean(metrics.prefix_agreement(c, r) for c, r in zip(candidates, references)),
        "exact_match": mean(float(metrics.exact_match(c, r)) for c, r in zip(candidates, references)),
        "distinct_2": mean(metrics.distinct_n(c, 2) for c in candidates),
        "repetition_rate": mean(metrics.repetition_rate(c, 4) for c in candidates),
        "mean_tokens": mean(len(c) for c in candidates),
    }


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or not math.isfinite(num) or not math.isfinite(den) or den == 0:
        return None
    return num / den


def retention(diff: dict, ar: dict) -> dict:
    """Diffusion relative to AR, every entry oriented so that higher is better and 1 = no loss."""
    out = {
        "token_agreement": diff["token_agreement"],  # AR agrees with itself: 1
        "exact_match": diff["exact_match"],
        "distinct_2": _ratio(diff["distinct_2"], ar["distinct_2"]),
        "non_repetition": _ratio(1 - diff["repetition_rate"], 1 - ar["repetition_rate"]),
        "judge_perplexity": _ratio(ar.get("judge_perplexity"), diff.get("judge_perplexity")),
        "humaneval_pass_at_1": _ratio(diff.get("humaneval_pass_at_1"), ar.get("humaneval_pass_at_1")),
    }
    for key, nll in diff.get("block_nll", {}).items():
        out[f"block_nll_{key}"] = _ratio(nll["ar_nll"], nll["diffusion_nll"])
    return out


def aggregate(ret: dict) -> float | None:
    """Geometric mean of the defined text-quality retentions (a zero retention makes it zero)."""
    values = [ret[k] for k in AGGREGATED if ret.get(k) is not None]
    if not values:
        return None
    if min(values) <= 0:
        return 0.0
    return math.exp(mean(math.log(v) for v in values))


def _t_key(t: float) -> str:
    return "t1" if t == 1.0 else f"t{t:g}"


def _check(settings: QualitySettings) -> None:
    def whole(value, low: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= low

    checks = {
        "batch size": whole(settings.batch_size, 1), "max new tokens": whole(settings.max_new_tokens, 1),
        "HumanEval max new tokens": whole(settings.humaneval_max_new_tokens, 1),
        "NLL window": whole(settings.nll_window, 2),
        "HumanEval problems": settings.humaneval_problems is None or whole(settings.humaneval_problems, 0),
        "NLL mask levels (in (0, 1])": bool(settings.nll_t) and all(
            isinstance(t, int | float) and 0 < t <= 1 for t in settings.nll_t),
        "--thresholds (in [0, 1])": settings.thresholds is None or all(
            isinstance(t, int | float) and 0 <= t <= 1 for t in settings.thresholds),
    }
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise UsageError(f"eval quality: invalid {', '.join(bad)}")


def run_quality(settings: QualitySettings) -> dict:
    _check(settings)
    output_dir = prepare_output_dir(settings.output_dir)
    rows = load_prompt_set(settings.prompts_file, settings.prompts)
    loaded = load_model(settings.model, settings.dtype, settings.device, untrained=settings.untrained,
                        exact=settings.exact, quantize=settings.quantize,
                        quantize_drafter=settings.quantize_drafter, compile=settings.compile, long_lived=True)
    warn_untrained(loaded)
    model, tokenizer, note = loaded.model, loaded.tokenizer, loaded.note
    if tokenizer is None:
        raise UsageError(f"{settings.model} has no tokenizer: the prompts are text")
    texts = [r["text"] for r in rows]
    chat = settings.chat and bool(getattr(tokenizer, "chat_template", None))  # a base model may have none: plain text
    prompt_ids = [encode_prompt(tokenizer, t, chat) for t in texts]
    dials = settings_grid(loaded.recommended, settings.thresholds, settings.block_sizes, settings.tree_nodes,
                          verify=settings.verify,
                          steps_per_block=settings.steps_per_block, commit_rule=settings.commit_rule,
                          fused=settings.fused, max_new_tokens=settings.max_new_tokens)
    settings = replace(settings, commit_rule=dials[0].commit_rule, verify=dials[0].verify, fused=dials[0].fused,
                       steps_per_block=dials[0].steps_per_block)
    ar_settings = resolve_settings(mode="ar", max_new_tokens=settings.max_new_tokens)
    judge = Judge(settings.judge) if settings.judge else None

    def judged(tokens: list[list[int]]) -> float | None:
        if judge is None:
            return None
        return judge.corpus(texts, [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]).perplexity

    ar_tokens, ar_tpn = decode_all(model, prompt_ids, ar_settings, settings.batch_size, "AR")
    ar = text_metrics(ar_tokens, ar_tokens) | {"tokens_per_nfe": ar_tpn, "judge_perplexity": judged(ar_tokens)}

    # block NLL depends on the block size only, not on the threshold
    heldout_ids = tokenizer(block_nll.heldout_text(settings.heldout), add_special_tokens=False)["input_ids"]
    token_windows = block_nll.windows(heldout_ids, settings.nll_window)
    block_sizes = sorted({d.block_size or model.block_size for d in dials})
    nll = {s: {_t_key(t): asdict(block_nll.block_nll(model, token_windows, s, t)) for t in settings.nll_t}
           for s in block_sizes}

    problems = humaneval.load_problems(settings.humaneval_problems) if settings.humaneval_problems != 0 else []
    code_prompts = [tokenizer(p["prompt"], add_special_tokens=True)["input_ids"] for p in problems]

    def pass_at_1(dial: DecodingSettings) -> tuple[float | None, list[dict]]:
        if not problems:
            return None, []
        dial = dial.replace(max_new_tokens=settings.humaneval_max_new_tokens)
        tokens, _ = decode_all(model, code_prompts, dial, settings.batch_size, "HumanEval")
        completions = [humaneval.truncate_completion(tokenizer.decode(t, skip_special_tokens=True)) for t in tokens]
        results = [humaneval.check_completion(p, c) for p, c in zip(problems, completions)]
        return humaneval.pass_at_1(results), [asdict(r) | {"completion": c} for r, c in zip(results, completions)]

    ar["humaneval_pass_at_1"], ar_humaneval = pass_at_1(ar_settings)
    results = []
    for dial in dials:
        size = dial.block_size or model.block_size
        tokens, tpn = decode_all(model, prompt_ids, dial, settings.batch_size, dial.label(model.block_size))
        diff = text_metrics(tokens, ar_tokens) | {"tokens_per_nfe": tpn, "judge_perplexity": judged(tokens)}
        diff["humaneval_pass_at_1"], he = pass_at_1(dial)
        diff["block_nll"] = nll[size]
        ret = retention(diff, ar)
        results.append({"block_size": size, "threshold": dial.confidence_threshold, "settings": dial.to_dict(),
                        "metrics": diff, "retention": ret, "aggregate_retention": aggregate(ret),
                        "continuations": [tokenizer.decode(t, skip_special_tokens=True) for t in tokens],
                        "humaneval": he})

    report = {
        "settings": asdict(settings),
        "denoiser": note or "trained",
        "judge": settings.judge,
        "heldout": {"path": settings.heldout, "tokens": len(heldout_ids),
                    "source": "paragraphs written for this project (Apache-2.0)"
                    if Path(settings.heldout) == block_nll.HELDOUT else "user-supplied"},
        "aggregate_of": list(AGGREGATED),
        "ar": ar | {"continuations": [tokenizer.decode(t, skip_special_tokens=True) for t in ar_tokens],
                    "humaneval": ar_humaneval},
        "diffusion": results,
    }
    write_report(report, output_dir)
    return report


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def markdown(report: dict) -> str:
    ar = report["ar"]
    lines = [
        f"Model `{report['settings']['model']}` ({report['settings']['dtype']}); denoiser: {report['denoiser']}; "
        f"judge `{report['judge']}`; {len(ar['continuations'])} prompts, {report['settings']['max_new_tokens']} "
        f"new tokens max, commit rule {report['settings']['commit_rule']}"
        + (", verified" if report["settings"]["verify"] else "")
        + ".",
        "",
        "| S | threshold | tokens/NFE | mean tokens (AR) | token agr. | exact | judge ppl (AR) | distinct-2 (AR) | rep. (AR) "
        "| block NLL t=1 (AR) | pass@1 (AR) | retention |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["diffusion"]:
        m = r["metrics"]
        t1 = m["block_nll"].get("t1")
        threshold = "–" if report["settings"].get("steps_per_block") == 1 else r["threshold"]
        lines.append(
            f"| {r['block_size']} | {threshold} | {m['tokens_per_nfe']:.2f} "
            f"| {m['mean_tokens']:.1f} ({ar['mean_tokens']:.1f}) | {m['token_agreement']:.3f} "
            f"| {m['exact_match']:.2f} | {_fmt(m['judge_perplexity'], 2)} ({_fmt(ar['judge_perplexity'], 2)}) "
            f"| {m['distinct_2']:.3f} ({ar['distinct_2']:.3f}) | {m['repetition_rate']:.3f} ({ar['repetition_rate']:.3f}) "
            f"| {_fmt(t1 and t1['diffusion_nll'])} ({_fmt(t1 and t1['ar_nll'])}) "
            f"| {_fmt(m['humaneval_pass_at_1'])} ({_fmt(ar['humaneval_pass_at_1'])}) "
            f"| {_fmt(r['aggregate_retention'])} |"
        )
    lines += ["", "Retention = diffusion / AR, higher is better (AR / diffusion for perplexity and NLL); the last "
              f"column is the geometric mean of {', '.join(report['aggregate_of'])} where defined."]
    return "\n".join(lines) + "\n"


def write_report(report: dict, output_dir: Path) -> None:
    atomic_write(output_dir / "quality.json", json.dumps(report, indent=2))
    atomic_write(output_dir / "quality.md", markdown(report))
    print(markdown(report))
    print(f"wrote {output_dir / 'quality.json'} and {output_dir / 'quality.md'}", file=sys.stderr)
