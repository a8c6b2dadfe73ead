"""Chat backends for automated interpretability: the built-in SmolLM2 and any OpenAI-compatible server.

Both take a batch of chats (lists of {"role", "content"} messages) and return one answer per chat:
the answer's text, or an `LLMAnswerError` for a chat whose answer could not be had (timeout, refusal,
server error), so one bad answer never stops a batch.

* `LocalChat`: SmolLM2-135M-Instruct through transformers on the plain Hugging Face folder that
  `activations.models.smollm2_folder()` makes from the bundled GGUF; batched, greedy, left-padded.
  transformers, not llama-cpp-python, by measurement (`benchmarks/explainer_backends.py`, 16 latents'
  prompts, 2 cores): 4.6 s a latent against 7.7 s for llama-cpp-python on the Q4_1 GGUF, which
  answers one prompt at a time; llama-cpp-python also has no wheel on the package index (a ~30 min
  source build).
* `OpenAIChat`: the `openai` client against `--explainer-url` (vLLM, llama.cpp server, Ollama,
  OpenAI, or `saewb serve-llm`); `check()` reaches the server and finds the model before any work.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

Message = dict[str, str]
Chat = list[Message]

BUILTIN_EXPLAINER = "smollm2"
API_KEY_ENV = "SAEWB_EXPLAINER_API_KEY"
"""The endpoint's key is read from this variable (then OPENAI_API_KEY); local servers need none."""


class LLMAnswerError(RuntimeError):
    """One chat got no usable answer; the job records it and goes on."""


class EndpointError(ValueError):
    """The endpoint cannot serve at all (unreachable, wrong URL, unknown model): stop before any work."""


class ChatBackend(Protocol):
    model: str
    """What the explanations table records as the model."""

    def check(self) -> None: ...

    def chat(self, chats: Sequence[Chat], max_tokens: int) -> list[str | LLMAnswerError]: ...

    def choose(self, chats: Sequence[Chat], options: Sequence[str]) -> list[str | LLMAnswerError]: ...


class LocalChat:
    """SmolLM2-135M-Instruct via transformers, batched greedy decoding on the CPU."""

    def __init__(self, batch_size: int = 16, threads: int | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from activations.models import smollm2_folder

        folder = smollm2_folder()
        self.model = BUILTIN_EXPLAINER
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.tokenizer.padding_side = "left"  # generation continues every row from its own last token
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.lock = threading.Lock()  # one generate at a time (the server may call from threads)

    def check(self) -> None:
        return None

    def _batches(self, chats: Sequence[Chat]) -> Any:
        """(chat indices, left-padded encoding) per batch; similar lengths side by side for less padding."""
        order = sorted(range(len(chats)), key=lambda i: sum(len(m["content"]) for m in chats[i]))
        for lo in range(0, len(order), self.batch_size):
            idx = order[lo : lo + self.batch_size]
            texts = [
                self.tokenizer.apply_chat_template(chats[i], tokenize=False, add_generation_prompt=True)
                for i in idx
            ]
            yield idx, self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)

    def chat(self, chats: Sequence[Chat], max_tokens: int) -> list[str | LLMAnswerError]:
        import torch

        answers: dict[int, str] = {}
        for idx, enc in self._batches(chats):
            with self.lock, torch.inference_mode():
                gen = self.lm.generate(
                    **enc,
                    max_new_tokens=max_tokens,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                )
            for i, row in zip(idx, gen[:, enc["input_ids"].shape[1] :], strict=True):
                answers[i] = self.tokenizer.decode(row, skip_special_tokens=True).strip()
        return [answers[i] or LLMAnswerError("empty answer") for i in range(len(chats))]

    def choose(self, chats: Sequence[Chat], options: Sequence[str]) -> list[str | LLMAnswerError]:
        """The option whose first token the model rates highest as its answer's first token (one forward pass)."""
        import torch

        first = [self.tokenizer.encode(o, add_special_tokens=False)[0] for o in options]
        picked: dict[int, str] = {}
        for idx, enc in self._batches(chats):
            with self.lock, torch.inference_mode():
                logits = self.lm(**enc).logits[:, -1, first]
            for i, best in zip(idx, logits.argmax(-1).tolist(), strict=True):
                picked[i] = options[best]
        return [picked[i] for i in range(len(chats))]


class OpenAIChat:
    """Any OpenAI-compatible chat endpoint through the `openai` client; requests run a few at a time."""

    def __init__(self, url: str, model: str, timeout_s: float = 60.0, concurrency: int = 4) -> None:
        from openai import OpenAI

        self.url, self.model, self.concurrency = url, model, concurrency
        key = os.environ.get(API_KEY_ENV) or os.environ.get("OPENAI_API_KEY") or "none"
        self.client = OpenAI(base_url=url, api_key=key, timeout=timeout_s, max_retries=1)

    def check(self) -> None:
        """Reach the server and find the model, or one line saying what is wrong and how to fix it."""
        import openai

        try:
            served = [m.id for m in self.client.models.list()]
        except openai.APIConnectionError as err:
            raise EndpointError(
                f"cannot reach the explainer endpoint {self.url} ({err.__cause__ or err}); check --explainer-url "
                "(for example http://127.0.0.1:8080/v1) and that the server is running"
            ) from None
        except openai.AuthenticationError:
            raise EndpointError(
                f"the explainer endpoint {self.url} refused the API key; set {API_KEY_ENV} (or OPENAI_API_KEY)"
            ) from None
        except openai.APIStatusError as err:
            raise EndpointError(
                f"the explainer endpoint {self.url} answered HTTP {err.status_code} to GET /models; --explainer-url "
                "must be the API base, usually ending in /v1"
            ) from None
        if self.model not in served:
            raise EndpointError(
                f"model {self.model!r} is not served by {self.url}; it serves: {', '.join(served) or 'nothing'} "
                "(fix --explainer-model)"
            )

    def _one(self, chat: Chat, max_tokens: int) -> str | LLMAnswerError:
        import openai

        try:
            reply = self.client.chat.completions.create(
                model=self.model,
                messages=chat,
                max_tokens=max_tokens,
                temperature=0.0,  # type: ignore[arg-type]
            )
        except openai.OpenAIError as err:  # timeout, refusal by status, connection lost mid-job
            return LLMAnswerError(f"{type(err).__name__}: {str(err)[:200]}")
        choices = getattr(reply, "choices", None) or []
        if not choices or choices[0].message is None:
            return LLMAnswerError("malformed answer: no choices")
        if getattr(choices[0].message, "refusal", None):
            return LLMAnswerError(f"refused: {choices[0].message.refusal[:200]}")
        text = (choices[0].message.content or "").strip()
        return text if text else LLMAnswerError("empty answer")

    def chat(self, chats: Sequence[Chat], max_tokens: int) -> list[str | LLMAnswerError]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda c: self._one(c, max_tokens), chats))

    def choose(self, chats: Sequence[Chat], options: Sequence[str]) -> list[str | LLMAnswerError]:
        """A short answer matched to the option it names first (servers differ in logprob support)."""
        pattern = re.compile(r"\b(" + "|".join(re.escape(o) for o in options) + r")\b", re.IGNORECASE)
        by_lower = {o.lower(): o for o in options}
        out: list[str | LLMAnswerError] = []
        for answer in self.chat(chats, 8):
            hit = pattern.search(answer) if isinstance(answer, str) else None
            if isinstance(answer, LLMAnswerError):
                out.append(answer)
            elif hit:
                out.append(by_lower[hit.group(1).lower()])
            else:
                out.append(LLMAnswerError(f"malformed answer: not {'/'.join(options)}: {answer[:40]!r}"))
        return out


def make_backend(url: str | None, model: str | None, timeout_s: float = 60.0, batch_size: int = 16) -> Any:
    """The built-in SmolLM2 without a URL, else the endpoint's client (checked before any work)."""
    if url:
        if not model:
            raise EndpointError("--explainer-url needs --explainer-model NAME (the model the server serves)")
        backend = OpenAIChat(url, model, timeout_s=timeout_s)
        backend.check()
        return backend
    if model and model != BUILTIN_EXPLAINER:
        raise EndpointError(
            f"--explainer-model {model!r} needs --explainer-url; without a URL the built-in {BUILTIN_EXPLAINER} explains"
        )
    return LocalChat(batch_size=batch_size)
