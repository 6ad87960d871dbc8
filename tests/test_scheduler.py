"""Continuous batching: rows join a running decode at step boundaries (prefilled in one piece or in chunks
between decode steps), leave when finished or cancelled, and each request produces exactly what it
produces alone; prefill stays within its budget per decode step, and nothing on the step path makes the host
wait for the device. Also the stop rule and log-probabilities. CPU (reference path); the same on a GPU."""

import pytest
import torch

import persimmon_rt as prt
from persimmon_rt.demo import demo_model_path
from persimmon_rt.engine import Engine

from model_utils import random_model, tiny_config
from sync_audit import HostWaits

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and prt.ops.HAVE_CUDA_EXT else [])


def lively_model(device="cpu"):
    """Large init so greedy decoding does not collapse onto one token (a stronger equality check); head_dim
    64 on the GPU, where the kernels need it."""
    gpu = dict(hidden_size=256, num_attention_heads=4, max_position_embeddings=128) if device == "cuda" else {}
    config = tiny_config(eos_token_id=None, initializer_range=0.25, **gpu)
    dtype = torch.float32 if device == "cpu" else torch.float16
    return random_model(prt.PersimmonForCausalLM, config, dtype).to(device)


def engine_for(model, **kwargs):
    """An engine whose decode GEMVs are the same at every bucket size. These tests compare, exactly, rows
    decoded beside others with the same prompts decoded alone: not with the one-row path that has the
    LayerNorms folded in, which rounds differently (test_folded_layernorm.py checks it)."""
    engine = Engine(model, model.config, **kwargs)
    engine.forward.fold_layernorms(False)
    return engine


def alone(engine, prompt, n):
    return engine.generate([prompt], max_new_tokens=n, stop_token_ids=[]).token_ids[0]


def run(scheduler, arrivals):
    """Step the scheduler; arrivals maps a boundary index to the requests submitted there. Returns the order
    in which (request tag, token count) events came out."""
    log, counts, boundary = [], {}, 0
    while scheduler.busy() or any(b >= boundary for b in arrivals):
        for request in arrivals.get(boundary, []):
            scheduler.submit(request)
        for event in scheduler.step():      # a boundary may read two results: count events, not output_ids
            tag = event.request.tag
            counts[tag] = counts.get(tag, 0) + (event.token_id is not None)
            log.append((tag, counts[tag]))
        boundary += 1
    return log


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prefill_budget", [None, 3])
def test_a_row_joining_a_running_decode_produces_what_it_produces_alone(device, prefill_budget):
    torch.manual_seed(0)
    model = lively_model(device)
    engine = engine_for(model, max_batch_size=4, max_seq_len=64)
    first, late = torch.randint(1, 97, (5,)).tolist(), torch.randint(1, 97, (11,)).tolist()
    expected = {"first": alone(engine, first, 24), "late": alone(engine, late, 10)}
    scheduler = engine.scheduler(prefill_budget=prefill_budget)
    requests = {"first": engine.request(first, 24, stop_token_ids=[], tag="first"),
                "late": engine.request(late, 10, stop_token_ids=[], tag="late")}
    log = run(scheduler, {0: [requests["first"]], 6: [requests["late"]]})
    assert {tag: r.output_ids for tag, r in requests.items()} == expected
    # "late" joined while "first" was decoding, and "first" kept going after it joined.
    first_late = log.index(("late", 1))
    assert 1 < dict(log[:first_late]).get("first", 0) and ("first", 24) in log[first_late:]
    assert [r.finish_reason for r in requests.values()] == ["length", "length"]


@pytest.mark.parametrize("device", DEVICES)
def test_a_running_row_gets_a_token_at_every_boundary_that_reads_a_result(device):
    """Also at the boundary that reads a joining row's first token (its prefill's result, queued between
    two decode steps): the step behind it is read there too, so the running row does not wait it out."""
    torch.manual_seed(6)
    model = lively_model(device)
    engine = engine_for(model, max_batch_size=4, max_seq_len=64)
    scheduler = engine.scheduler(prefill_budget=4)
    scheduler.submit(engine.request(torch.randint(1, 97, (5,)).tolist(), 40, stop_token_ids=[], tag="first"))
    returned = []
    while scheduler.busy():
        if len(returned) in (6, 14):
            scheduler.submit(engine.request(torch.randint(1, 97, (11,)).tolist(), 5, stop_token_ids=[],
                                            tag=f"late{len(returned)}"))
        returned.append({e.request.tag for e in scheduler.step() if e.token_id is not None})
    running = [i for i, tags in enumerate(returned) if "first" in tags]
    joins = [i for i, tags in enumerate(returned) if any(t.startswith("late") for t in tags)]
    assert joins and all("first" in returned[i] for i in range(running[0], running[-1]) if returned[i])


@pytest.mark.parametrize("device", DEVICES)
def test_more_requests_than_rows_wait_for_free_rows_and_cancelled_ones_free_theirs(device):
    torch.manual_seed(1)
    model = lively_model(device)
    engine = engine_for(model, max_batch_size=2, max_seq_len=48)
    prompts = [torch.randint(1, 97, (n,)).tolist() for n in (2, 9, 4, 7, 3)]
    budgets = [3, 12, 5, 8, 6]
    scheduler = engine.scheduler()
    requests = [engine.request(p, n, stop_token_ids=[], tag=i) for i, (p, n) in enumerate(zip(prompts, budgets))]
    doomed = engine.request(prompts[1], 30, stop_token_ids=[], tag="doomed")
    for r in [doomed] + requests:
        scheduler.submit(r)
    for _ in range(2):
        scheduler.step()
    assert scheduler.rows_in_use() == 2 and len(scheduler.waiting) == 4 and doomed.output_ids
    scheduler.cancel(doomed)
    run(scheduler, {})
    assert doomed.finish_reason == "cancelled" and len(doomed.output_ids) < 30
    for r, p, n in zip(requests, prompts, budgets):
        assert r.output_ids == alone(engine, p, n), r.tag


def test_prefill_between_decode_steps_stays_within_the_budget_while_rows_decode(monkeypatch):
    """While a row decodes, the prompt tokens prefilled between two decode launches never exceed the budget
    (also across boundaries that process a prefill's result instead of a step's), and the budget is used."""
    torch.manual_seed(2)
    model = lively_model()
    engine = engine_for(model, max_batch_size=4, max_seq_len=64)
    scheduler = engine.scheduler(prefill_budget=4)
    prefill, launch = engine.forward.prefill, engine.graphs.launch
    log = []                              # ("prefill", tokens, first decoding) and ("step",) in launch order

    def counting_prefill(pieces):
        decoding = bool(first.output_ids) and first.finish_reason is None
        log.append(("prefill", sum(take for _, _, _, take in pieces), decoding))
        return prefill(pieces)

    def counting_launch(*args, **kwargs):
        log.append(("step",))
        return launch(*args, **kwargs)

    monkeypatch.setattr(engine.forward, "prefill", counting_prefill)
    monkeypatch.setattr(engine.graphs, "launch", counting_launch)
    first = engine.request(torch.randint(1, 97, (6,)).tolist(), 30, stop_token_ids=[], tag="first")
    late = [engine.request(torch.randint(1, 97, (n,)).tolist(), 4, stop_token_ids=[], tag=n) for n in (9, 7, 5)]
    scheduler.submit(first)
    while scheduler.busy():
        if scheduler.decode_steps == 3:
            for r in late:
                scheduler.submit(r)
        scheduler.step()
    assert sum(entry[1] for entry in log if entry[0] == "prefill") == 6 + 9 + 7 + 5
    between, runs = 0, []                 # prefill tokens while decoding, per interval between launches
    for entry in log:
        if entry[0] == "step":
            runs.append(between)
            between = 0
        elif entry[2]:
            between += entry[1]
    runs.append(between)
    assert max(runs) == 4 and sum(runs) == 9 + 7 + 5
    assert all(r.finish_reason == "length" for r in [first] + late)


@pytest.mark.parametrize("budget", [None, 3])
def test_the_step_path_makes_no_call_that_waits_for_the_device(budget):
    """CPU audit (sync_audit.py): what would stall the two-steps-ahead pipeline on a GPU."""
    torch.manual_seed(3)
    model = lively_model()
    engine = engine_for(model, max_batch_size=4, max_seq_len=64)
    scheduler = engine.scheduler(prefill_budget=budget)
    first = engine.request(torch.randint(1, 97, (5,)).tolist(), 20, stop_token_ids=[], tag="first")
    late = engine.request(torch.randint(1, 97, (11,)).tolist(), 6, stop_token_ids=[], tag="late")
    one = engine.request(torch.randint(1, 97, (4,)).tolist(), 1, stop_token_ids=[], tag="one")   # never decodes
    gone = engine.request(torch.randint(1, 97, (3,)).tolist(), 20, stop_token_ids=[], tag="gone")
    embeds = engine.forward.embed(torch.randint(1, 97, (7,)))
    with HostWaits() as audit:
        run(scheduler, {0: [first], 4: [late, one, gone]})
        engine.forward.prefill([(2, embeds, 0, 7), (0, torch.randint(1, 97, (3,)), 0, 3)])   # embeddings + ids
    assert audit.calls == []
    with HostWaits() as audit:          # the audit sees what it should (the code the fix replaced)
        exec(compile("torch.tensor([1], device='cpu'); torch.zeros(2).to('cpu'); torch.ones(3)[[0, 2]];"
                     "bool(torch.ones(1)); x = torch.ones(3); x[x > 0] = 0", prt.forward.__file__, "exec"),
             {"torch": torch})
    assert [" ".join(c.split()[1:4]) for c in audit.calls] == [
        "puts host data", "blocking transfer (to)", "indexes with a", "reads a value", "indexes with a"]


@pytest.mark.skipif(not (torch.cuda.is_available() and prt.ops.HAVE_CUDA_EXT), reason="needs a CUDA GPU and the "
                    "extension: torch.cuda.set_sync_debug_mode has nothing to watch on the CPU")
def test_rows_join_and_leave_a_running_decode_without_a_synchronising_call_gpu():
    torch.manual_seed(4)
    model = lively_model("cuda")
    engine = engine_for(model, max_batch_size=4, max_seq_len=64)
    prompts = {"first": torch.randint(1, 97, (5,)).tolist(), "late": torch.randint(1, 97, (11,)).tolist()}
    expected = {"first": alone(engine, prompts["first"], 24), "late": alone(engine, prompts["late"], 10)}
    scheduler = engine.scheduler(prefill_budget=3)
    run(scheduler, {0: [engine.request(prompts["late"], 3, stop_token_ids=[])]})     # lazy initialisation
    requests = {"first": engine.request(prompts["first"], 24, stop_token_ids=[], temperature=0.0, tag="first"),
                "late": engine.request(prompts["late"], 10, stop_token_ids=[], logprobs=2, tag="late")}
    embeds = engine.forward.embed(torch.tensor([5, 6], device="cuda"))
    torch.cuda.set_sync_debug_mode("error")     # a synchronising call raises (the results' event wait is not one)
    try:
        run(scheduler, {0: [requests["first"]], 6: [requests["late"]]})
        engine.forward.prefill([(3, embeds, 0, 2), (2, torch.tensor([7, 8, 9]), 0, 3)])   # CPU ids beside embeddings
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert {tag: r.output_ids for tag, r in requests.items()} == expected


@pytest.mark.skipif(not (torch.cuda.is_available() and prt.ops.HAVE_CUDA_EXT), reason="needs a CUDA GPU and the "
                    "extension: the CPU path has no GEMM kernels to load")
def test_a_budget_past_the_gemv_rows_runs_every_cublas_row_count_first_and_changes_no_output(monkeypatch):
    torch.manual_seed(5)
    model = lively_model("cuda")
    engine = engine_for(model, max_batch_size=4, max_seq_len=96)
    first, late = torch.randint(1, 97, (5,)).tolist(), torch.randint(1, 97, (45,)).tolist()
    expected = {"first": alone(engine, first, 30), "late": alone(engine, late, 10)}
    rows, linear = [], torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, b=None: rows.append(x.shape[0]) or linear(x, w, b))
    scheduler = engine.scheduler(prefill_budget=40)
    monkeypatch.undo()
    gemv_rows = prt.ops.DECODE_LINEAR_MAX_ROWS
    assert sorted(set(rows)) == list(range(gemv_rows + 1, 41)) and len(rows) == 4 * (40 - gemv_rows)
    requests = {"first": engine.request(first, 30, stop_token_ids=[], tag="first"),
                "late": engine.request(late, 10, stop_token_ids=[], tag="late")}
    run(scheduler, {0: [requests["first"]], 4: [requests["late"]]})      # "late": chunks of 40 and 5
    assert {tag: r.output_ids for tag, r in requests.items()} == expected


@pytest.fixture(scope="module")
def demo_engine():
    return Engine.from_pretrained(demo_model_path(), dtype=torch.float32, device="cpu", max_batch_size=2,
                                  max_seq_len=256)


def test_text_stops_before_the_stop_string_when_streamed_and_when_not(demo_engine):
    prompt = "JULIET:"
    plain = demo_engine.generate([prompt], max_new_tokens=40, stop_token_ids=[])
    text = plain.texts[0]
    stop = text.strip().split()[3]                       # a word the greedy continuation reaches
    cut = text.index(stop)
    result = demo_engine.generate([prompt], max_new_tokens=40, stop_strings=[stop], stop_token_ids=[])
    streamed = "".join(e.text for e in demo_engine.generate([prompt], max_new_tokens=40, stop_strings=[stop],
                                                            stop_token_ids=[], stream=True))
    assert result.texts[0] == streamed == text[:cut]
    assert result.finish_reasons == ["stop"]
    # token_ids run up to and including the token that completed the stop string.
    ids = result.token_ids[0]
    tok = demo_engine.tokenizer
    assert ids == plain.token_ids[0][:len(ids)]
    assert stop in tok.decode(ids, skip_special_tokens=True) and stop not in tok.decode(ids[:-1],
                                                                                        skip_special_tokens=True)


def test_a_stop_token_adds_no_text_and_empty_stop_strings_are_refused(demo_engine):
    plain = demo_engine.generate(["ROMEO:"], max_new_tokens=12, stop_token_ids=[])
    stop_id = plain.token_ids[0][5]
    result = demo_engine.generate(["ROMEO:"], max_new_tokens=12, stop_token_ids=[stop_id])
    ids = result.token_ids[0]
    assert ids[-1] == stop_id and result.finish_reasons == ["stop"]
    assert result.texts[0] == demo_engine.tokenizer.decode(ids[:-1], skip_special_tokens=True)
    with pytest.raises(ValueError, match="stop strings must be non-empty"):
        demo_engine.generate(["ROMEO:"], stop_strings=[""])


def test_logprobs_are_the_models_log_softmax(demo_engine):
    events = list(demo_engine.generate(["KING:"], max_new_tokens=6, logprobs=3, stop_token_ids=[], stream=True))
    ids = demo_engine.tokenizer.encode("KING:") + [e.token_id for e in events]
    model = prt.PersimmonForCausalLM.from_pretrained(demo_model_path(), dtype=torch.float32)
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    start = len(ids) - len(events) - 1
    for i, e in enumerate(events):
        row = logp[start + i]
        assert e.logprob == pytest.approx(row[e.token_id].item(), abs=1e-4)
        top = row.topk(3)
        assert [t for t, _ in e.top_logprobs] == top.indices.tolist()          # greedy: the chosen one first
        assert [lp for _, lp in e.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert e.top_logprobs[0][0] == e.token_id
