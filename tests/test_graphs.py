"""lk.graphed_step: a training step captured as one CUDA graph (eager off CUDA), same results as the plain loop."""

import pytest
import torch

import lorakit as lk
from models import clone, example_input, make, randomize

CUDA = torch.cuda.is_available()


def adapted(dropout: float = 0.0, device: str = "cpu"):
    model = make("llama")
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, dropout=dropout, targets="all-linear"))
    randomize(model, std=0.1)
    return model.to(device).train()


def batch(device: str = "cpu", seed: int = 1):
    ids = example_input("llama", batch=4, seed=seed).to(device)
    return {"input_ids": ids, "labels": ids}


def plain_steps(model, opt, batches, max_grad_norm=None):
    losses = []
    for b in batches:
        opt.zero_grad(set_to_none=True)
        loss = model(**b).loss
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(lk.trainable_parameters(model)), max_grad_norm)
        opt.step()
        losses.append(loss.detach())
    return losses


def adapter_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_off_cuda_it_is_the_plain_training_step():
    m1 = adapted()
    m2 = clone(m1)
    batches = [batch(seed=s) for s in (1, 2, 3)]
    o1 = torch.optim.AdamW(lk.trainable_parameters(m1), lr=1e-2)
    o2 = torch.optim.AdamW(lk.trainable_parameters(m2), lr=1e-2)
    step = lk.graphed_step(m2, o2, batches[0], max_grad_norm=0.5)
    want = plain_steps(m1, o1, batches, max_grad_norm=0.5)
    got = [step(b) for b in batches]
    assert step.graph is None
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    s1, s2 = adapter_state(m1), adapter_state(m2)
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not all(torch.equal(s1[k], p) for k, p in adapter_state(adapted()).items())  # it did train


def test_a_batch_of_another_shape_is_refused_with_the_fix():
    model = adapted()
    opt = torch.optim.AdamW(lk.trainable_parameters(model), lr=1e-3)
    step = lk.graphed_step(model, opt, batch())
    ids = torch.randint(0, 96, (4, 7))
    with pytest.raises(lk.GraphError, match="pad every batch to one length"):
        step({"input_ids": ids, "labels": ids})
    with pytest.raises(lk.GraphError, match="loss_fn"):
        lk.graphed_step(model, opt, [ids])
    with pytest.raises(lk.GraphError, match="must be a tensor"):
        lk.graphed_step(model, opt, {"input_ids": ids, "labels": ids.tolist()})


def test_custom_loss_and_sequence_batch():
    model = adapted()
    opt = torch.optim.SGD(lk.trainable_parameters(model), lr=1e-2)
    ids = example_input("llama")
    step = lk.graphed_step(model, opt, [ids], loss_fn=lambda m, b: m(input_ids=b[0]).logits.float().square().mean())
    first = step([ids])
    for _ in range(5):
        last = step([ids])
    assert last < first  # SGD on the mean square of the logits pushes them down


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("fused", [False, True])
def test_captured_step_matches_the_eager_loop_on_the_gpu(fused):
    m1 = adapted(device="cuda")
    m2 = clone(m1)
    before = adapter_state(m2)
    batches = [batch("cuda", seed=s) for s in (1, 2, 3, 4)]
    o1 = torch.optim.AdamW(lk.trainable_parameters(m1), lr=1e-2, capturable=True, fused=fused)
    o2 = torch.optim.AdamW(lk.trainable_parameters(m2), lr=1e-2, capturable=True, fused=fused)
    step = lk.graphed_step(m2, o2, batches[0], max_grad_norm=0.5)
    assert step.graph is not None
    after = adapter_state(m2)  # the warm-up steps were undone
    assert all(torch.equal(before[k], after[k]) for k in before)
    sched = torch.optim.lr_scheduler.LambdaLR(o2, lambda i: 0.5 ** i)
    sched1 = torch.optim.lr_scheduler.LambdaLR(o1, lambda i: 0.5 ** i)
    want, got = [], []
    for b in batches:
        want += plain_steps(m1, o1, [b], max_grad_norm=0.5)
        sched1.step()
        got.append(step(b))
        sched.step()
    for a, b in zip(want, got):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (want, got)
    s1, s2 = adapter_state(m1), adapter_state(m2)
    assert all(torch.allclose(s1[k], s2[k], rtol=1e-3, atol=1e-5) for k in s1)
    with pytest.raises(lk.GraphError, match="capturable=True"):
        lk.graphed_step(m1, torch.optim.AdamW(lk.trainable_parameters(m1), lr=1e-3), batches[0])


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_routed_training_is_captured_and_matches_the_eager_loop():
    """Two adapters trained at once under lk.route (rows dealt per example): the captured step gives the
    plain loop's losses and adapters."""
    def two_adapters():
        torch.manual_seed(0)
        model = make("llama")
        for name in ("a", "b"):
            lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets="all-linear"), name=name)
        randomize(model, std=0.1)
        return model.to("cuda").train()

    m1, m2 = two_adapters(), two_adapters()
    batches = [batch("cuda", seed=s) for s in (1, 2, 3)]
    o1 = torch.optim.AdamW(lk.trainable_parameters(m1), lr=1e-2, capturable=True)
    o2 = torch.optim.AdamW(lk.trainable_parameters(m2), lr=1e-2, capturable=True)
    names = ["a", "b", None, "b"]
    before = adapter_state(m2)
    with lk.route(m1, names), lk.route(m2, names):
        step = lk.graphed_step(m2, o2, batches[0])
        assert step.graph is not None
        want = plain_steps(m1, o1, batches)
        got = [step(b) for b in batches]
    for a, b in zip(want, got):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (want, got)
    s1, s2 = adapter_state(m1), adapter_state(m2)
    for name in ("a", "b"):  # both adapters trained
        assert any(not torch.equal(before[k], s2[k]) for k in s2 if f".adapters.{name}." in k)
    assert all(torch.allclose(s1[k], s2[k], rtol=1e-3, atol=1e-5) for k in s1)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_dropout_stays_random_across_replays():
    model = adapted(dropout=0.3, device="cuda")
    opt = torch.optim.AdamW(lk.trainable_parameters(model), lr=0.0, capturable=True)  # lr 0: weights fixed
    b = batch("cuda")
    rng = torch.cuda.get_rng_state()
    step = lk.graphed_step(model, opt, b)
    assert torch.equal(torch.cuda.get_rng_state(), rng)  # the warm-up's seeds are not the caller's
    losses = {step(b).item() for _ in range(4)}
    assert len(losses) == 4  # a fresh dropout mask in every replay


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_a_failed_capture_leaves_the_process_able_to_train():
    """A step with a host synchronization cannot be captured: GraphError, and then eager steps (with dropout)
    and a later capture work as in a fresh process, and the parameters are those of before."""
    model = adapted(dropout=0.2, device="cuda")
    opt = torch.optim.AdamW(lk.trainable_parameters(model), lr=1e-2, capturable=True, fused=True)
    b = batch("cuda")
    before = adapter_state(model)

    def syncing(m, bt):
        loss = m(**bt).loss
        return loss * 1.0 if loss.item() > -1 else loss

    with pytest.raises(lk.GraphError, match="could not be captured"):
        lk.graphed_step(model, opt, b, syncing)
    assert all(p.grad is None for p in lk.trainable_parameters(model))
    after = adapter_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    losses = plain_steps(model, opt, [b, b, b])  # random ops on the GPU (dropout seeds) work again
    assert all(torch.isfinite(x) for x in losses) and len({x.item() for x in losses}) == 3
    step = lk.graphed_step(model, opt, b)
    assert step.graph is not None and len({step(b).item() for _ in range(3)}) == 3


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_out_of_memory_in_the_capture_is_a_graph_error():
    model = adapted(dropout=0.2, device="cuda")
    opt = torch.optim.AdamW(lk.trainable_parameters(model), lr=1e-2, capturable=True, fused=True)
    b = batch("cuda")

    def oom_when_capturing(m, bt):
        loss = m(**bt).loss
        if torch.cuda.is_current_stream_capturing():
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return loss

    with pytest.raises(lk.GraphError, match="out of memory while capturing"):
        lk.graphed_step(model, opt, b, oom_when_capturing)
    losses = plain_steps(model, opt, [b, b])
    assert all(torch.isfinite(x) for x in losses)
    assert lk.graphed_step(model, opt, b).graph is not None


def accumulation_steps(model, opt, groups, max_grad_norm):
    """The plain loop: each group's micro-batches' scaled losses backward, then clip, step, zero."""
    params = list(lk.trainable_parameters(model))
    losses = []
    for group in groups:
        total = 0.0
        for b in group:
            loss = model(**b).loss / len(group)
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


def run_accumulating(model, opt, groups, max_grad_norm):
    def scaled(m, b):
        return m(**b).loss / 2

    steps, update, losses = {}, None, []
    for group in groups:
        total = 0.0
        for b in group:
            n = b["input_ids"].shape[1]
            if n not in steps:  # built mid-accumulation: what earlier micro-batches added must survive
                steps[n] = lk.graphed_step(model, None, b, scaled, accumulate=True)
            total += steps[n](b)
        if update is None:
            update = lk.graphed_update(opt, max_grad_norm=max_grad_norm)
        update()
        losses.append(total)
    return losses, steps, update


def accumulation_groups(device):
    short = {k: v[:, :6] for k, v in batch(device, seed=9).items()}  # a second shape, first met mid-group
    return [[batch(device, seed=1), short], [batch(device, seed=2), batch(device, seed=3)],
            [short, batch(device, seed=4)]]


def test_accumulating_steps_and_graphed_update_off_cuda_are_the_plain_loop():
    m1 = adapted()
    m2 = clone(m1)
    o1 = torch.optim.AdamW(lk.trainable_parameters(m1), lr=1e-2)
    o2 = torch.optim.AdamW(lk.trainable_parameters(m2), lr=1e-2)
    groups = accumulation_groups("cpu")
    want = accumulation_steps(m1, o1, groups, 0.5)
    got, steps, update = run_accumulating(m2, o2, groups, 0.5)
    assert update.graph is None and all(s.graph is None for s in steps.values())
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    s1, s2 = adapter_state(m1), adapter_state(m2)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert all(p.grad is not None and not p.grad.any() for p in lk.trainable_parameters(m2))  # zeroed in place
    with pytest.raises(lk.GraphError, match="optimizer=None"):
        lk.graphed_step(m2, o2, groups[0][0], accumulate=True)
    with pytest.raises(lk.GraphError, match="no gradient yet"):
        lk.graphed_update(torch.optim.AdamW(lk.trainable_parameters(adapted()), lr=1e-2))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_captured_accumulation_matches_the_eager_loop_on_the_gpu():
    m1 = adapted(device="cuda")
    m2 = clone(m1)
    o1 = torch.optim.AdamW(lk.trainable_parameters(m1), lr=1e-2, capturable=True, fused=True)
    o2 = torch.optim.AdamW(lk.trainable_parameters(m2), lr=1e-2, capturable=True, fused=True)
    groups = accumulation_groups("cuda")
    want = accumulation_steps(m1, o1, groups, 0.5)
    got, steps, update = run_accumulating(m2, o2, groups, 0.5)
    assert update.graph is not None and all(s.graph is not None for s in steps.values()) and len(steps) == 2
    for a, b in zip(want, got):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (want, got)
    s1, s2 = adapter_state(m1), adapter_state(m2)
    assert all(torch.allclose(s1[k], s2[k], rtol=1e-3, atol=1e-5) for k in s1)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gradient_checkpointing_is_captured_with_its_dropout_masks():
    """A checkpointed step, captured, is the step without checkpointing: its recomputation draws the dropout
    seeds of the forward, replay after replay."""
    results = []
    for ckpt in (False, True):
        model = adapted(dropout=0.2, device="cuda")
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        opt = torch.optim.AdamW(lk.trainable_parameters(model), lr=1e-2, capturable=True, fused=True)
        b = batch("cuda")
        torch.cuda.manual_seed(123)
        step = lk.graphed_step(model, opt, b, max_grad_norm=1.0)
        assert step.graph is not None
        results.append(([step(b) for _ in range(4)], adapter_state(model)))
    (l0, s0), (l1, s1) = results
    assert all(torch.equal(a, b) for a, b in zip(l0, l1)) and len({x.item() for x in l0}) == 4
    assert all(torch.allclose(s0[k], s1[k], rtol=1e-5, atol=1e-6) for k in s0)
