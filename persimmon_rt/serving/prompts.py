"""A checked request's sequences for the engine: completion prompts tokenized; a chat rendered in Persimmon's
`human: ...\\n\\nadept:` format, or for a Fuyu model its one user message and image laid out by the image
processor; then one scheduler Request per prompt and choice. Errors are 400s naming the problem.

It decodes images (tens of milliseconds for a large one), so the app runs it off the event loop.
"""

from __future__ import annotations

from ..fuyu.image import ImageError
from .protocol import CHAT_TURN_END, Completion, bad, image_bytes

COMPLETIONS_DEFAULT_MAX_TOKENS = 16       # the OpenAI completions API's default


def build_requests(engine, parsed: Completion, max_queue: int, model_name: str) -> list:
    """One scheduler request per prompt and choice (choice index = prompt index * n + j)."""
    s, param = parsed.sampling, "messages" if parsed.chat else "prompt"
    prompts = _prompts(engine, parsed, model_name)
    if len(prompts) * s.n > max_queue:
        raise bad("n", f"{len(prompts)} prompt(s) x n={s.n} is more sequences than the server queues at once "
                       f"({max_queue})")
    # Persimmon's chat model goes on to write the next human turn; Fuyu has no turns.
    stops = s.stop + [CHAT_TURN_END] * (parsed.chat and engine.images is None)
    requests = []
    for ids, patches in prompts:
        max_tokens = s.max_tokens or (engine.max_seq_len - len(ids) if parsed.chat else COMPLETIONS_DEFAULT_MAX_TOKENS)
        if len(ids) + max(max_tokens, 1) > engine.max_seq_len:
            raise bad(param, f"this model's maximum context length is {engine.max_seq_len} tokens, but the prompt "
                             f"has {len(ids)} tokens and max_tokens is {max_tokens}", code="context_length_exceeded")
        for _ in range(s.n):
            try:
                requests.append(engine.request(ids, max_tokens, s.temperature, s.top_k, s.top_p, stop_strings=stops,
                                               logprobs=s.logprobs, patches=patches))
            except ValueError as exc:
                raise bad(param, str(exc)) from None
    return requests


def _prompts(engine, parsed: Completion, model_name: str) -> list[tuple[list[int], object]]:
    """(token ids, image patches or None) per prompt."""
    if parsed.chat and engine.images is not None:
        return [_fuyu_chat(engine, parsed)]
    if parsed.images:
        raise bad(parsed.images[0].param, f"the model '{model_name}' is text-only: image content parts need a "
                                          "multimodal (Fuyu) model")
    try:
        if parsed.chat:
            return [(engine.tokenizer.apply_chat_template(parsed.messages, tokenize=True), None)]
        return [(engine.tokenizer.encode(p) if isinstance(p, str) else p, None) for p in parsed.prompts]
    except (ValueError, TypeError) as exc:        # UnicodeError included (a lone surrogate, say)
        raise bad("messages" if parsed.chat else "prompt", f"cannot tokenize the prompt: {exc}") from None


def _fuyu_chat(engine, parsed: Completion) -> tuple[list[int], object]:
    """Fuyu has no conversation format: one user message (system text folded in) with at most one image,
    laid out as `Engine.generate(prompt, images=image)` lays it out."""
    turns, images = parsed.messages, parsed.images
    if len(turns) != 1 or turns[0]["role"] != "user":
        raise bad("messages", f"a Fuyu model answers one user message (with at most one image), got "
                              f"{' + '.join(t['role'] for t in turns)} turns")
    if len(images) > 1:
        raise bad(images[1].param, f"a Fuyu model takes at most one image per request, got {len(images)}")
    image = image_bytes(images[0]) if images else None
    try:
        return engine.images.prompt(turns[0]["content"], image)
    except ImageError as exc:
        raise bad(images[0].param, str(exc)) from None
    except (ValueError, TypeError) as exc:
        raise bad("messages", f"cannot tokenize the prompt: {exc}") from None
