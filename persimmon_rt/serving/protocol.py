"""The OpenAI API's request bodies, checked: what the server accepts, and the errors it answers with.

Known fields are checked for type and range and a bad one is named in a 400; fields of the API this server
does not implement are refused when set to anything but their neutral value (a penalty of 0, `echo` false,
...), so a client never silently gets something other than what it asked for; bookkeeping fields (`user`,
`metadata`, ...) are accepted and ignored; any other field is refused as OpenAI refuses it. Chat content
parts are text and images; an image comes as a base64 data URL (`image_bytes`), since the server fetches
nothing from the network.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field

from ..sampling import MAX_LOGPROBS

MAX_STOP_STRINGS = 4        # the OpenAI API's limit
MAX_N = 16
# The chat model goes on to write the next human turn itself; a reply ends where that turn would start.
CHAT_TURN_END = "\n\nhuman:"


class APIError(Exception):
    """An error answered in the OpenAI format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str | None, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class Sampling:
    max_tokens: int | None              # None: the completions default, or the rest of the context for chat
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None             # accepted, best effort: the batch shares one generator
    stop: list[str] = field(default_factory=list)
    n: int = 1
    stream: bool = False
    include_usage: bool = False         # stream_options.include_usage: a final chunk with usage only
    logprobs: int | None = None         # alternatives per token; None: no log-probabilities


@dataclass
class ImagePart:
    """A chat message's image content part, as given: decode it with `image_bytes`."""
    param: str                          # where it is in the body, for errors: messages[i].content[j]
    url: str


@dataclass
class Completion:
    """A checked /v1/completions or /v1/chat/completions body."""
    model: str
    sampling: Sampling
    prompts: list = field(default_factory=list)       # completions: strings or token-id lists
    messages: list[dict] | None = None                # chat: user/assistant turns, system text folded in
    chat: bool = False
    images: list[ImagePart] = field(default_factory=list)      # chat: image parts of the messages, in order


def _kind(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _integer(body: dict, name: str, default, low: int | None = None, high: int | None = None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(name, f"'{name}' must be an integer, got {_kind(value)}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise bad(name, f"'{name}' must be {bounds}, got {value}")
    return value


def _number(body: dict, name: str, default: float, low: float, high: float, open_low: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(name, f"'{name}' must be a number, got {_kind(value)}")
    if value != value or value > high or value < low or (open_low and value == low):
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}]"
        raise bad(name, f"'{name}' must be in {interval}, got {value}")
    return float(value)


def _boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(name, f"'{name}' must be a boolean, got {_kind(value)}")
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise bad("stop", "'stop' must be a non-empty string or an array of non-empty strings")
    if len(stop) > MAX_STOP_STRINGS:
        raise bad("stop", f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
    return stop


# Implemented nowhere here: accepted only at these neutral values.
_NEUTRAL = {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "echo": (False,), "suffix": ("",),
            "logit_bias": ({},), "best_of": (1,), "tools": ([],), "functions": ([],), "tool_choice": ("none",),
            "response_format": ({"type": "text"},)}


_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
            "safety_identifier", "reasoning_effort", "verbosity", "modalities", "audio", "prediction",
            "web_search_options", "function_call"}
_SAMPLING = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream", "stream_options",
             "logprobs"}
_FIELDS = {"completions": _SAMPLING | {"prompt"},
           "chat": _SAMPLING | {"messages", "top_logprobs", "max_completion_tokens"}}


def _refuse_unsupported(body: dict, api: str) -> None:
    for name in body:
        if name not in _FIELDS[api] and name not in _NEUTRAL and name not in _IGNORED:
            raise bad(name, f"unrecognized request argument supplied: {name}")
    for name, neutral in _NEUTRAL.items():
        value = body.get(name)
        if value is not None and not any(value == v and type(value) is type(v) for v in neutral):
            raise bad(name, f"'{name}' is not supported by this server (only {neutral[0]!r} or null)")


def _model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "'model' is required and must be a string" if model is None
                  else f"'model' must be a non-empty string, got {_kind(model)}")
    return model


def _sampling(body: dict, logprobs: int | None, max_tokens_names: tuple[str, ...]) -> Sampling:
    max_tokens = None
    for name in max_tokens_names:
        max_tokens = _integer(body, name, max_tokens, low=1)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("stream_options", f"'stream_options' must be an object, got {_kind(options)}")
    stream = _boolean(body, "stream", False)
    if options and not stream:
        raise bad("stream_options", "'stream_options' is only allowed when 'stream' is true")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad("seed", f"'seed' must be an integer, got {_kind(seed)}")
    top_k = _integer(body, "top_k", 0, low=-1)
    return Sampling(max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                    top_p=_number(body, "top_p", 1.0, 0.0, 1.0, open_low=True), top_k=max(top_k, 0), seed=seed,
                    stop=_stop(body), n=_integer(body, "n", 1, 1, MAX_N), stream=stream,
                    include_usage=_boolean(options or {}, "include_usage", False), logprobs=logprobs)


def _object(body, api: str) -> dict:
    if not isinstance(body, dict):
        raise bad(None, f"the request body must be a JSON object, got {_kind(body)}")
    _refuse_unsupported(body, api)
    return body


def parse_completion(body) -> Completion:
    """A /v1/completions body: `prompt` is a string, an array of strings, an array of token ids, or an array
    of arrays of token ids."""
    body = _object(body, "completions")
    model = _model(body)
    logprobs = _integer(body, "logprobs", None, 0, MAX_LOGPROBS)
    sampling = _sampling(body, logprobs, ("max_tokens",))
    return Completion(model, sampling, prompts=_prompts(body.get("prompt")))


def _prompts(prompt) -> list:
    def ids(p) -> bool:
        return isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)

    if isinstance(prompt, str):
        prompts = [prompt]
    elif ids(prompt) and prompt:
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or (ids(p) and p) for p in prompt):
        prompts = prompt
    else:
        raise bad("prompt", "'prompt' must be a string, an array of strings, an array of token ids or an array "
                            "of arrays of token ids (none empty)" if prompt is not None else "'prompt' is required")
    if any(isinstance(p, str) and not p for p in prompts):
        raise bad("prompt", "'prompt' must not be empty")
    return prompts


def parse_chat(body) -> Completion:
    """A /v1/chat/completions body. System (and developer) messages are folded into the user turn that
    follows them: Persimmon's chat format has only human and adept turns."""
    body = _object(body, "chat")
    model = _model(body)
    want = _boolean(body, "logprobs", False)
    top = _integer(body, "top_logprobs", None, 0, MAX_LOGPROBS)
    if top is not None and not want:
        raise bad("top_logprobs", "'top_logprobs' needs 'logprobs' set to true")
    sampling = _sampling(body, (top or 0) if want else None, ("max_tokens", "max_completion_tokens"))
    images: list[ImagePart] = []
    messages = _messages(body.get("messages"), images)
    return Completion(model, sampling, messages=messages, chat=True, images=images)


def _content(message: dict, i: int, images: list[ImagePart]) -> str:
    """A message's text; its image parts (user messages only) are appended to `images`."""
    content = message.get("content")
    if content is None and message.get("role") == "assistant":
        return ""
    if isinstance(content, list):
        return "".join(_part(part, f"messages[{i}].content[{j}]", message.get("role"), images)
                       for j, part in enumerate(content))
    if not isinstance(content, str):
        raise bad(f"messages[{i}].content", f"'messages[{i}].content' must be a string, got {_kind(content)}")
    return content


def _part(part, where: str, role, images: list[ImagePart]) -> str:
    """A content part's text ("" for an image part, which goes to `images`)."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return part["text"]
    if kind == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else None
        if not isinstance(url, str):
            raise bad(where, f"'{where}.image_url' must be an object with a string 'url'")
        if role != "user":
            raise bad(where, f"image parts are only allowed in user messages, not in a {role!r} message")
        images.append(ImagePart(where, url))
        return ""
    if kind == "text":
        raise bad(where, f"'{where}.text' must be a string")
    if kind is None:
        raise bad(where, f"'{where}' must be a content part: an object with a 'type' ('text' or 'image_url')")
    raise bad(where, f"unsupported content part type {kind!r}: this server takes 'text' and 'image_url' parts")


_DATA_URL = re.compile(r"data:(?P<media>[^;,]*)(?P<params>(;[^;,]*)*),(?P<data>.*)", re.DOTALL)


def image_bytes(part: ImagePart) -> bytes:
    """The encoded image of a base64 data URL (data:image/png;base64,...). Anything else is a 400: the
    server fetches no URLs."""
    url = part.url.strip()
    where = f"{part.param}.image_url.url"
    if url.lower().startswith(("http://", "https://")):
        raise bad(where, "image URLs are not fetched: this server makes no network requests; send the image "
                         "inline as a base64 data URL (data:image/png;base64,...)")
    match = _DATA_URL.fullmatch(url)
    if match is None:
        raise bad(where, "the image must be a base64 data URL (data:image/png;base64,...)")
    if not match["media"].lower().startswith("image/"):
        raise bad(where, f"the data URL's media type must be image/..., got {match['media'] or 'none'!r}")
    if ";base64" not in match["params"].lower():
        raise bad(where, "only base64 data URLs are supported (data:image/png;base64,...)")
    try:
        data = base64.b64decode(match["data"], validate=True)
    except (binascii.Error, ValueError):
        raise bad(where, "the data URL's payload is not valid base64") from None
    if not data:
        raise bad(where, "the image is empty (0 bytes)")
    return data


def _messages(messages, images: list[ImagePart]) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "'messages' must be a non-empty array" if messages is not None
                  else "'messages' is required")
    turns, system = [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad(f"messages[{i}]", f"'messages[{i}]' must be an object, got {_kind(message)}")
        role, content = message.get("role"), _content(message, i, images)
        if role in ("system", "developer"):
            system.append(content.strip())
        elif role in ("user", "assistant"):
            if role == "user" and system:
                content, system = "\n\n".join(system + [content.strip()]), []
            turns.append({"role": role, "content": content})
        else:
            raise bad(f"messages[{i}].role", f"unsupported role {role!r}: use 'system', 'user' or 'assistant'")
    if system:
        turns.append({"role": "user", "content": "\n\n".join(system)})
    return turns
