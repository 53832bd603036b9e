"""speechllm.losses: divergences against plain-Python loops, chunked lm_loss against the unchunked path, the
liger kernel against the torch one (its fallback on CPU; its numbers on CUDA)."""

from __future__ import annotations

import math
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from speechllm import losses
from speechllm.config import LossKernel
from speechllm.losses import lm_loss, token_divergence

N, D, V = 10, 8, 50


def _softmax_row(row: list[float], temperature: float) -> list[float]:
    scaled = [x / temperature for x in row]
    top = max(scaled)
    exps = [math.exp(x - top) for x in scaled]
    return [e / sum(exps) for e in exps]


def _kl_loop(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def _divergence_loop(teacher: torch.Tensor, student: torch.Tensor, direction: str, temperature: float) -> list:
    out = []
    for t_row, s_row in zip(teacher.tolist(), student.tolist()):
        p_t, p_s = _softmax_row(t_row, temperature), _softmax_row(s_row, temperature)
        if direction == "forward":
            out.append(_kl_loop(p_t, p_s))
        elif direction == "reverse":
            out.append(_kl_loop(p_s, p_t))
        else:
            m = [(a + b) / 2 for a, b in zip(p_t, p_s)]
            out.append(0.5 * _kl_loop(p_t, m) + 0.5 * _kl_loop(p_s, m))
    return out


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("direction", ["forward", "reverse", "jsd"])
def test_token_divergence_matches_python_loops(direction, temperature):
    torch.manual_seed(0)
    teacher, student = torch.randn(3, 5) * 2, torch.randn(3, 5) * 2
    got = token_divergence(teacher, student, direction=direction, temperature=temperature)
    assert got.shape == (3,) and got.dtype == torch.float32
    want = _divergence_loop(teacher, student, direction, temperature)
    assert got.tolist() == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_token_divergence_identities():
    torch.manual_seed(1)
    teacher, student = torch.randn(6, 7), torch.randn(6, 7) * 3
    assert torch.allclose(token_divergence(teacher, teacher), torch.zeros(6), atol=1e-6)
    jsd = token_divergence(teacher, student, direction="jsd")
    assert torch.allclose(jsd, token_divergence(student, teacher, direction="jsd"), atol=1e-6)
    assert bool((jsd <= math.log(2) + 1e-6).all()) and bool((jsd > 0).all())
    far_apart = torch.tensor([[100.0, 0.0], [0.0, 100.0]])  # disjoint supports: JSD -> log 2
    assert token_divergence(far_apart[:1], far_apart[1:], direction="jsd").item() == pytest.approx(math.log(2))
    assert torch.allclose(token_divergence(teacher, student, direction="reverse"),
                          token_divergence(student, teacher, direction="forward"))


def test_token_divergence_zero_probabilities_are_safe():
    # -inf logits (e.g. a padded vocabulary) give p == 0: those terms are 0, never nan.
    teacher = torch.tensor([[1.0, 2.0, -math.inf, 0.5]])
    student = torch.tensor([[0.3, -1.0, -math.inf, 2.0]], requires_grad=True)
    for direction in ("forward", "reverse", "jsd"):
        got = token_divergence(teacher, student, direction=direction)
        want = _divergence_loop(teacher[:, [0, 1, 3]], student.detach()[:, [0, 1, 3]], direction, 1.0)
        assert got.tolist() == pytest.approx(want, rel=1e-5)
    for direction in ("forward", "reverse"):
        (grad,) = torch.autograd.grad(token_divergence(teacher, student, direction=direction).sum(), student)
        assert bool(torch.isfinite(grad).all())


def test_token_divergence_rejects_unknown_direction():
    with pytest.raises(ValueError, match=r"'backward'.*forward.*reverse.*jsd"):
        token_divergence(torch.zeros(1, 3), torch.zeros(1, 3), direction="backward")


def _inputs(seed: int = 0, n: int = N):
    torch.manual_seed(seed)
    head = torch.nn.Linear(D, V)  # trainable weight and bias
    teacher_head = torch.nn.Linear(D, V, bias=False)
    for p in teacher_head.parameters():
        p.requires_grad_(False)
    student = torch.randn(n, D, requires_grad=True)
    teacher = torch.randn(n, D)
    targets = torch.randint(0, V, (n,))
    return head, teacher_head, student, teacher, targets


def _values_and_grads(out: dict, student: torch.Tensor, head: torch.nn.Linear):
    grads = torch.autograd.grad(out["loss"], [student, head.weight, head.bias])
    return [out[k].detach() for k in ("loss", "ce", "kl")], grads


@pytest.mark.parametrize("separate_teacher_head", [False, True])
@pytest.mark.parametrize("direction,temperature", [("forward", 1.0), ("reverse", 2.0), ("jsd", 1.5)])
def test_chunked_equals_unchunked(direction, temperature, separate_teacher_head):
    head, teacher_head, student, teacher, targets = _inputs()
    kwargs = dict(teacher_hidden=teacher, teacher_head=teacher_head if separate_teacher_head else None,
                  alpha=0.3, direction=direction, temperature=temperature, scale_by_t2=True)
    want_values, want_grads = _values_and_grads(lm_loss(student, head, targets, chunk_size=0, **kwargs),
                                                student, head)
    for chunk_size in (2, 3, 7):
        out = lm_loss(student, head, targets, chunk_size=chunk_size, **kwargs)
        assert out["n_tokens"].item() == N
        values, grads = _values_and_grads(out, student, head)
        for got, want in zip(values + list(grads), want_values + list(want_grads)):
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), chunk_size


def test_ce_matches_cross_entropy_and_kl_matches_divergence_of_full_logits():
    head, teacher_head, student, teacher, targets = _inputs(seed=1)
    out = lm_loss(student, head, targets, teacher_hidden=teacher, teacher_head=teacher_head, alpha=0.5,
                  temperature=2.0, chunk_size=4)
    assert out["ce"].item() == pytest.approx(F.cross_entropy(head(student), targets).item(), rel=1e-6)
    # without scale_by_t2 the KL is the plain token mean at temperature 2
    full = token_divergence(teacher_head(teacher), head(student), temperature=2.0).mean()
    assert out["kl"].item() == pytest.approx(full.item(), rel=1e-5)


def test_teacher_side_gets_no_gradient_through_a_shared_head():
    # teacher_head defaults to lm_head: the teacher logits are a fixed target, so the head weight's
    # gradient is that of KL(stop_grad(teacher) || student) only.
    head, _, student, teacher, targets = _inputs(seed=2)
    teacher.requires_grad_(True)
    out = lm_loss(student, head, targets, teacher_hidden=teacher, alpha=1.0, chunk_size=3)
    *got, teacher_grad = torch.autograd.grad(out["loss"], [head.weight, student, teacher], allow_unused=True)
    # What autograd returns for the teacher: nothing flows back to it (None: not in the graph).
    assert teacher_grad is None or not teacher_grad.any(), teacher_grad
    reference = token_divergence(head(teacher).detach(), head(student)).mean()
    want = torch.autograd.grad(reference, [head.weight, student])
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_alpha_interpolates_kl_and_ce(alpha):
    head, teacher_head, student, teacher, targets = _inputs(seed=3)
    out = lm_loss(student, head, targets, teacher_hidden=teacher, teacher_head=teacher_head, alpha=alpha,
                  chunk_size=4)
    assert out["kl"].item() > 0 and out["ce"].item() > 0
    want = alpha * out["kl"].item() + (1 - alpha) * out["ce"].item()
    assert out["loss"].item() == pytest.approx(want, rel=1e-6)


def test_no_teacher_means_zero_kl_and_plain_ce():
    head, _, student, _, targets = _inputs(seed=4)
    calls = []
    head.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    out = lm_loss(student, head, targets, chunk_size=4)
    assert out["kl"].item() == 0.0
    assert out["loss"].item() == pytest.approx(out["ce"].item())
    assert calls == [4, 4, 2]  # the head ran once per chunk: on student rows only, no teacher pass
    with pytest.raises(ValueError, match="teacher_hidden"):
        lm_loss(student, head, targets, alpha=0.5)


def test_scale_by_t2_multiplies_kl_by_temperature_squared():
    head, teacher_head, student, teacher, targets = _inputs(seed=5)
    kwargs = dict(teacher_hidden=teacher, teacher_head=teacher_head, alpha=1.0, temperature=2.0, chunk_size=4)
    plain = lm_loss(student, head, targets, **kwargs)
    scaled = lm_loss(student, head, targets, scale_by_t2=True, **kwargs)
    assert scaled["kl"].item() == pytest.approx(4.0 * plain["kl"].item(), rel=1e-6)
    assert scaled["ce"].item() == pytest.approx(plain["ce"].item())


@pytest.mark.parametrize("chunk_size", [0, 4])
def test_no_positions_backpropagates_zeros(chunk_size):
    head, teacher_head, _, _, _ = _inputs(seed=6)
    hidden = torch.randn(2, 5, D, requires_grad=True)  # a batch where no position predicts a text token
    none = torch.zeros(2, 5, dtype=torch.bool)
    out = lm_loss(hidden[none], head, torch.zeros(0, dtype=torch.long), teacher_hidden=torch.randn(0, D),
                  teacher_head=teacher_head, alpha=0.5, chunk_size=chunk_size)
    assert [out[k].item() for k in ("loss", "ce", "kl", "n_tokens")] == [0.0, 0.0, 0.0, 0]
    out["loss"].backward()
    assert hidden.grad is not None and not hidden.grad.any()
    assert head.weight.grad is not None and not head.weight.grad.any()


def test_chunked_forward_keeps_no_logits_for_backward():
    # What autograd saves outside the checkpoints is the whole memory story: with chunking no tensor of
    # vocabulary width survives the forward; without it, (N, V) tensors do.
    head, teacher_head, student, teacher, targets = _inputs(seed=7)

    def largest_saved(chunk_size: int) -> int:
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lm_loss(student, head, targets, teacher_hidden=teacher, teacher_head=teacher_head, alpha=0.5,
                    chunk_size=chunk_size)
        return max(sizes, default=0)

    assert largest_saved(0) >= N * V
    assert largest_saved(3) < V


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.bfloat16().float()


def test_bf16_autocast_gives_float32_results_close_to_float32():
    head, teacher_head, student, teacher, targets = _inputs(seed=8)
    kwargs = dict(teacher_hidden=teacher, teacher_head=teacher_head, alpha=0.5, chunk_size=4)
    reference = lm_loss(student, head, targets, **kwargs)
    (reference_grad,) = torch.autograd.grad(reference["loss"], student)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lm_loss(student, head, targets, **kwargs)
    # Under autocast only the heads run in bf16: the losses are float32 arithmetic on bf16 logits.
    # By hand: the heads on bf16-rounded inputs, logits rounded to bf16, then float32 all the way.
    s_logp = torch.log_softmax(_bf16(F.linear(_bf16(student), _bf16(head.weight), _bf16(head.bias))), -1)
    t_logp = torch.log_softmax(_bf16(F.linear(_bf16(teacher), _bf16(teacher_head.weight))), -1)
    ce = -sum(s_logp[i, targets[i]] for i in range(N)) / N
    kl = sum((t_logp[i].exp() * (t_logp[i] - s_logp[i])).sum() for i in range(N)) / N
    for key, want in (("ce", ce), ("kl", kl), ("loss", 0.5 * kl + 0.5 * ce)):
        assert out[key].dtype == torch.float32
        assert out[key].item() == pytest.approx(want.item(), rel=1e-5), key  # seen <= 2e-7; a bf16 step after the heads: 1e-4 to 3e-3
        # bf16 did run (the values moved), within one bf16 rounding (2^-8 relative) of float32
        assert out[key].item() != reference[key].item()
        assert out[key].item() == pytest.approx(reference[key].item(), rel=2**-8), key
    (grad,) = torch.autograd.grad(out["loss"], student)
    assert grad.dtype == torch.float32
    assert float((grad - reference_grad).norm() / reference_grad.norm()) < 1e-2  # seen: 2.5e-3 to 3.7e-3


def test_bad_inputs_name_the_field():
    head, _, student, teacher, targets = _inputs(seed=9)
    with pytest.raises(ValueError, match="targets"):
        lm_loss(student, head, targets[:-1])
    with pytest.raises(ValueError, match="teacher_hidden"):
        lm_loss(student, head, targets, teacher_hidden=teacher[:-1], alpha=0.5)
    with pytest.raises(ValueError, match="'sideways'"):
        lm_loss(student, head, targets, teacher_hidden=teacher, alpha=0.5, direction="sideways")
    with pytest.raises(ValueError, match="alpha"):
        lm_loss(student, head, targets, teacher_hidden=teacher, alpha=1.5)
    with pytest.raises(ValueError, match="chunk_size"):
        lm_loss(student, head, targets, chunk_size=-1)


# --------------------------------------------------------------------------------------- kernels


def _distillation_kwargs(teacher, teacher_head, **overrides):
    return dict(teacher_hidden=teacher, teacher_head=teacher_head, alpha=0.5, direction="jsd", temperature=1.5,
                scale_by_t2=True, chunk_size=4) | overrides


def test_liger_on_cpu_falls_back_to_the_torch_values_and_warns_once(monkeypatch):
    monkeypatch.setattr(losses, "_warned_fallbacks", set())
    head, teacher_head, student, teacher, targets = _inputs(seed=10)
    kwargs = _distillation_kwargs(teacher, teacher_head)
    want_values, want_grads = _values_and_grads(lm_loss(student, head, targets, **kwargs), student, head)
    with pytest.warns(RuntimeWarning, match="'liger' unavailable: no CUDA device; using the torch") as record:
        outs = [lm_loss(student, head, targets, kernel=LossKernel.liger, **kwargs),  # the config's enum
                lm_loss(student, head, targets, kernel="liger", **kwargs)]
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    for out in outs:
        values, grads = _values_and_grads(out, student, head)
        for got, want in zip(values + list(grads), want_values + list(want_grads)):
            assert torch.equal(got, want)


def test_liger_missing_names_the_install_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # None in sys.modules: its import raises ImportError
    losses._liger_import_error.cache_clear()
    try:
        assert "liger-kernel not installed" in losses._liger_import_error()
        assert losses._liger_import_error().endswith("pip install liger-kernel")
    finally:
        losses._liger_import_error.cache_clear()


def test_unknown_kernel_is_refused():
    head, _, student, _, targets = _inputs(seed=11)
    with pytest.raises(ValueError, match=r"'cudnn'.*torch.*liger"):
        lm_loss(student, head, targets, kernel="cudnn")


@pytest.mark.parametrize("direction,temperature,alpha,scale_by_t2",
                         [("forward", 1.0, 1.0, False), ("reverse", 2.0, 0.5, True), ("jsd", 1.5, 0.3, True),
                          ("forward", 1.0, 0.0, False)])
def test_liger_distillation_maps_direction_temperature_and_weights_onto_ours(direction, temperature, alpha,
                                                                             scale_by_t2):
    # Liger's chunked fused linear JSD is plain torch: on CPU, uncompiled, in float32 it must give our numbers.
    pytest.importorskip("liger_kernel.chunked_loss")
    head, teacher_head, student, teacher, targets = _inputs(seed=12)
    teacher_head = torch.nn.Linear(D, V).requires_grad_(False)  # a teacher bias too
    inputs = losses.LossInputs(student, head, targets, teacher, teacher_head, alpha, direction, temperature,
                               scale_by_t2, chunk_size=4)
    for got, want in zip(losses._liger_distillation_terms(inputs, compiled=False), losses._torch_terms(inputs)):
        assert got.item() == pytest.approx(want.item(), rel=1e-5)  # seen <= 2e-7
    liger_grads = torch.autograd.grad(losses._liger_distillation_terms(inputs, compiled=False)[0],
                                      [student, head.weight, head.bias])
    torch_grads = torch.autograd.grad(losses._torch_terms(inputs)[0], [student, head.weight, head.bias])
    for got, want in zip(liger_grads, torch_grads):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def _peaked_bf16_inputs(n: int = 512, d: int = 64, vocab: int = 32000):
    """bf16 on CUDA: peaked logits (std ~3), a student close to its teacher (as after some distillation)."""
    g = torch.Generator().manual_seed(13)
    head = torch.nn.Linear(d, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, d, generator=g) * 3 / d**0.5)
    teacher = torch.randn(n, d, generator=g)
    student = teacher + 0.3 * torch.randn(n, d, generator=g)
    targets = torch.randint(vocab, (n,), generator=g)
    cuda = dict(device="cuda", dtype=torch.bfloat16)
    return (head.to(**cuda), student.to(**cuda).requires_grad_(True), teacher.to(**cuda), targets.cuda())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger-Kernel's fused losses need a CUDA device")
@pytest.mark.parametrize("alpha,direction", [(0.0, None), (1.0, "forward"), (0.5, "forward"), (1.0, "reverse"),
                                             (1.0, "jsd"), (0.5, "jsd")])
def test_liger_equals_torch_on_cuda_within_bf16_tolerance(alpha, direction):
    pytest.importorskip("liger_kernel.transformers")
    head, student, teacher, targets = _peaked_bf16_inputs()
    kwargs = dict(chunk_size=256) if direction is None else dict(
        teacher_hidden=teacher, alpha=alpha, direction=direction, temperature=1.0, chunk_size=256)
    results = {}
    for kernel in ("torch", "liger"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a fallback would compare torch with itself
            out = lm_loss(student, head, targets, kernel=kernel, **kwargs)
        results[kernel] = [out[k].item() for k in ("loss", "ce", "kl")], torch.autograd.grad(
            out["loss"], [student, head.weight])
    (want, want_grads), (got, got_grads) = results["torch"], results["liger"]
    # Tolerances, from the same comparison on CPU (Liger's JSD uncompiled, bf16): the CE agrees to ~1e-7
    # relative; Liger takes the divergence's log-softmax in bf16 where we take it in float32, so the divergence
    # differs by up to 1.3e-2 nats (jsd; forward 4e-4) and the gradients by up to 3.4e-2 in relative norm.
    assert got[1] == pytest.approx(want[1], rel=2e-3), "ce"
    assert got[2] == pytest.approx(want[2], abs=2e-2), "kl"
    assert got[0] == pytest.approx(want[0], rel=2e-3, abs=2e-2), "loss"
    for g, w in zip(got_grads, want_grads):
        assert float((g.float() - w.float()).norm() / w.float().norm()) < 5e-2
