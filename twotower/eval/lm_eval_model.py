"""lm-evaluation-harness model class ``twotower`` (optional extra ``lmeval``).

  lm_eval --model twotower --model_args pretrained=smollm2-135m,mode=mask_diffusion,confidence_threshold=0.9 ...

``generate_until`` decodes with the chosen mode (``ar``, ``mask_diffusion``, ``mock_ar``), the
requests' ``until`` strings ending the answer as stop strings;
``loglikelihood`` and ``loglikelihood_rolling`` score with the context tower, which is the
AR model itself (a block-diffusion model has no exact per-token likelihood of its own).
Importing this module registers the class with lm_eval.
"""

from __future__ import annotations

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from ..checkpoints import DEFAULT_MODEL
from ..checkpoints.two_tower import load_model, warn_untrained
from ..generate import decode, resolve_settings


@register_model("twotower")
class TwoTowerLM(LM):
    def __init__(
        self,
        pretrained: str = DEFAULT_MODEL,
        dtype: str = "float32",
        mode: str = "mask_diffusion",
        block_size: int | None = None,
        steps_per_block: int | None = None,
        confidence_threshold: float | None = None,
        commit_rule: str | None = None,
        verify: bool | None = None,
        fused: bool | None = None,
        tree_nodes: int | None = None,
        max_gen_toks: int = 256,
        batch_size: int | str = 1,  # accepted for lm_eval's CLI; requests run one at a time
        exact: bool = True,
        quantize: str = "none",
        quantize_drafter: str | None = None,
        compile: bool = False,
    ) -> None:
        """Decoding options left out follow the model's recommendation by the rule every front
        end uses (``twotower.generate.settings.resolve_settings``)."""
        super().__init__()
        loaded = load_model(pretrained, dtype, exact=exact, quantize=quantize, quantize_drafter=quantize_drafter,
                            compile=compile, long_lived=True)
        warn_untrained(loaded)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.note = loaded.note  # set when the denoiser is untrained
        # checked here, once: max_new_tokens and the stop strings come with each request
        self.settings = resolve_settings(loaded.recommended, mode=mode, block_size=block_size,
                                         steps_per_block=steps_per_block, confidence_threshold=confidence_threshold,
                                         commit_rule=commit_rule, verify=verify, fused=fused,
                                         tree_nodes=tree_nodes)
        self.max_gen_toks = max_gen_toks
        config = self.model.context.config
        self.max_length = config.max_position_embeddings
        # a scored text needs one token before it; BOS where the tokenizer has one, else EOS
        self.prefix_token = self.tokenizer.bos_token_id
        if self.prefix_token is None:
            self.prefix_token = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else config.eos_token_ids[0]

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.inference_mode()
    def _logprobs(self, context: list[int], target: list[int]) -> tuple[float, bool]:
        """Sum of log p(target | context) under the AR context tower, and whether every target
        token is the greedy choice. The context is cut from the left to fit the model."""
        ids = (context + target)[-(self.max_length + 1) :]
        scored = ids[-len(target) - 1 :]  # the last input predicts nothing
        inputs = torch.tensor([ids[:-1]], device=self.model.context.device)
        logp = self.model.context_forward(inputs)[0, -len(target) :].float().log_softmax(-1)
        wanted = torch.tensor(scored[1:], device=logp.device)
        total = float(logp.gather(1, wanted[:, None]).sum())
        return total, bool((logp.argmax(-1) == wanted).all())

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        out = []
        for req in tqdm(requests, desc="loglikelihood", disable=len(requests) < 2):
            context, continuation = req.args
            # encode together and split, so a word split across the boundary tokenises as in the text
            whole = self._encode(context + continuation)
            n_ctx = len(self._encode(context))
            ctx, target = whole[:n_ctx], whole[n_ctx:]
            if not target:  # the continuation merged into the context's last token
                ctx, target = self._encode(context), self._encode(continuation)
            out.append(self._logprobs([self.prefix_token] + ctx, target))
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for req in requests:
            ids = self._encode(req.args[0])
            windows = map(make_disjoint_window, get_rolling_token_windows(
                token_list=ids, prefix_token=self.prefix_token, max_seq_len=self.max_length, context_len=1))
            out.append(sum(self._logprobs(ctx, target)[0] for ctx, target in windows))
        return out

    def prompt_ids(self, context: str, max_new_tokens: int) -> list[int]:
        """The request's context as token ids, cut from the left so that the answer fits."""
        # the last diffusion block or draft may run up to block_size past max_new_tokens
        room = self.max_length - max_new_tokens - (self.settings.block_size or self.model.block_size)
        return ([self.prefix_token] + self._encode(context))[-room:]

    def generate_until(self, requests) -> list[str]:
        out = []
        for req in tqdm(requests, desc=f"generate ({self.settings.strategy})", disable=len(requests) < 2):
            context, gen_kwargs = req.args
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            temperature = float(gen_kwargs.get("temperature", 0.0)) if gen_kwargs.get("do_sample") else 0.0
            settings = self.settings.replace(max_new_tokens=max_new, temperature=temperature, stop_strings=tuple(until))
            result = decode(self.model, [self.prompt_ids(context, max_new)], settings, tokenizer=self.tokenizer)
            out.append(result.texts[0])
        return out
