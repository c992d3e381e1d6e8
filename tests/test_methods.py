"""Distillation methods (``hgkd.distill.methods``) against direct computations of their papers'
equations, a regression fixture over every registered method, and each method's bookkeeping
(HSAKD rotations, ICD's learnable scale, CRD's memory bank, gradient flow).

The direct computations use numpy and explicit loops, never the helpers under test.
Regenerate the fixture (only after an intended change of a method) with
``HGKD_REGEN_FIXTURES=1 pytest tests/test_methods.py -k regression`` or
``python tests/test_methods.py``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hgkd.distill.config import DistillConfig
from hgkd.distill.methods import METHODS, MethodContext, NetDims, create_method, method_class, method_options
from hgkd.distill.methods.crd import nce_loss
from hgkd.distill.rotation_task import joint_labels, rotate_batch, unrotated
from hgkd.distill.outputs import NetOutputs
from hgkd.errors import HgkdError

FIXTURE = Path(__file__).parent / "fixtures" / "method_losses.json"
REGEN_ENV = "HGKD_REGEN_FIXTURES"

B, K, N_TOK = 6, 5, 6  # images per batch, classes, tokens per view
STUDENT = NetDims(stage_channels=(3, 4, 5, 6), embed_dim=7, num_classes=K)
TEACHER = NetDims(stage_channels=(4, 5, 6, 8), embed_dim=9, num_classes=K)  # embed_dim = token width (H-GKD)
S_SIZES = (16, 8, 4, 2)
T_SIZES = (16, 4, 4, 4)  # stage 1: teacher coarser than the student, stage 3: finer, stages 0, 2: equal
NUM_SAMPLES = 20
CTX = MethodContext(student=STUDENT, teacher=TEACHER, num_samples=NUM_SAMPLES)
ROWS_PER_IMAGE = {"hsakd": 4}  # HSAKD's networks see the four rotations of each image
DTYPE = {"hgkd": torch.float32}  # H-GKD computes in float32 (cached targets are float32); the rest in float64
SMALL = {"crd": {"feat_dim": 16, "negatives": 16}, "icd": {"dim": 16}, "hgkd": {"queue_size": 16, "tau": 0.2}}


# --------------------------------------------------------------------------- inputs

def make_batch(rows: int = B, images: int = B, seed: int = 0, grad: bool = False,
               dtype: torch.dtype = torch.float64):
    """Seeded student/teacher outputs with every field filled, labels and indices."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g, dtype=torch.float64)

    t_tokens = r(rows, N_TOK, TEACHER.embed_dim)
    valid = torch.rand(rows, N_TOK, generator=g) > 0.4
    valid[:, 0] = True
    w = valid.unsqueeze(-1).double()
    pooled = F.normalize((t_tokens * w).sum(1) / w.sum(1), dim=-1)
    s_tokens = t_tokens + r(rows, N_TOK, TEACHER.embed_dim, scale=0.5)
    teacher = NetOutputs(logits=r(rows, K, scale=2.0), embedding=r(rows, TEACHER.embed_dim),
                         stages=[r(rows, c, s, s) for c, s in zip(TEACHER.stage_channels, T_SIZES)],
                         branch_logits=[r(rows, 4 * K, scale=2.0) for _ in STUDENT.stage_channels],
                         tokens=t_tokens, valid=valid, pooled=pooled)
    student = NetOutputs(logits=r(rows, K, scale=2.0), embedding=r(rows, STUDENT.embed_dim),
                         stages=[r(rows, c, s, s) for c, s in zip(STUDENT.stage_channels, S_SIZES)],
                         tokens=s_tokens)
    labels = torch.randint(0, K, (images,), generator=g)
    index = torch.randperm(NUM_SAMPLES, generator=g)[:images]
    for out in (student, teacher):
        for field, t in named_tensors(out).items():
            t = t.to(dtype).requires_grad_(grad)
            if "." in field:
                kind, i = field.split(".")
                getattr(out, kind)[int(i)] = t
            else:
                setattr(out, field, t)
    return student, teacher, labels, index


def batch_for(name: str, seed: int = 0, grad: bool = False):
    per = ROWS_PER_IMAGE.get(name, 1)
    return make_batch(rows=B * per, images=B, seed=seed, grad=grad, dtype=DTYPE.get(name, torch.float64))


def named_tensors(out: NetOutputs) -> dict[str, torch.Tensor]:
    """The floating-point tensors of a NetOutputs by field name (``stages.2``, ...)."""
    found = {k: getattr(out, k) for k in ("logits", "embedding", "tokens", "pooled")}
    found.update({f"stages.{i}": s for i, s in enumerate(out.stages)})
    found.update({f"branch_logits.{i}": s for i, s in enumerate(out.branch_logits)})
    return {k: v for k, v in found.items() if v is not None and v.is_floating_point()}


def build(name: str, **options):
    torch.manual_seed(0)
    return create_method(name, CTX, **{**SMALL.get(name, {}), **options}).to(DTYPE.get(name, torch.float64))


# --------------------------------------------------------------------------- direct maths (numpy)

def np_(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float64)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = x.max(axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis, keepdims=True))


def logsumexp(v: np.ndarray) -> float:
    m = v.max()
    return float(m + math.log(sum(math.exp(x - m) for x in v)))


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt((x**2).sum(1, keepdims=True))


def direct_ce(logits, labels) -> float:
    z, y = np_(logits), labels.tolist()
    return sum(logsumexp(z[i]) - z[i, y[i]] for i in range(len(y))) / len(y)


def direct_kd(student_logits, teacher_logits, temperature: float) -> float:
    """T^2 * (1/B) sum_b KL(softmax(t_b/T) || softmax(s_b/T))."""
    s, t = np_(student_logits) / temperature, np_(teacher_logits) / temperature
    total = 0.0
    for b in range(len(s)):
        p_t = softmax(t[b])
        total += float(np.sum(p_t * (np.log(p_t) - log_softmax(s[b]))))
    return temperature**2 * total / len(s)


def pearson_1d(x: np.ndarray, y: np.ndarray) -> float:
    xc, yc = x - x.mean(), y - y.mean()
    return float(xc @ yc / math.sqrt((xc @ xc) * (yc @ yc)))


def direct_dist(student_logits, teacher_logits, beta, gamma, tau) -> tuple[float, float]:
    y_s, y_t = softmax(np_(student_logits) / tau), softmax(np_(teacher_logits) / tau)
    inter = np.mean([1 - pearson_1d(y_s[b], y_t[b]) for b in range(len(y_s))])  # per sample, over classes
    intra = np.mean([1 - pearson_1d(y_s[:, k], y_t[:, k]) for k in range(y_s.shape[1])])  # per class, over batch
    return beta * tau**2 * inter, gamma * tau**2 * intra


def smooth_l1(x: np.ndarray) -> np.ndarray:
    return np.where(np.abs(x) < 1, 0.5 * x**2, np.abs(x) - 0.5)


def direct_rkd(student_emb, teacher_emb) -> tuple[float, float]:
    """(distance, angle) losses of Park et al., unweighted."""
    def distances(x):
        n = len(x)
        d = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                if i != j:
                    d[i, j] = math.sqrt(float(((x[i] - x[j]) ** 2).sum()))
        return d / (d.sum() / (n * (n - 1)))  # mean over the off-diagonal pairs

    def angles(x):
        n = len(x)
        a = np.zeros((n, n, n))
        for i in range(n):  # vertex
            for j in range(n):
                for k in range(n):
                    if j != i and k != i:
                        u, v = x[j] - x[i], x[k] - x[i]
                        a[i, j, k] = u @ v / math.sqrt((u @ u) * (v @ v))
        return a

    s, t = np_(student_emb), np_(teacher_emb)
    return (float(smooth_l1(distances(s) - distances(t)).mean()),
            float(smooth_l1(angles(s) - angles(t)).mean()))


def direct_pkt(student_emb, teacher_emb, eps: float = 1e-7) -> float:
    def conditional(x):
        n = len(x)
        kern = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                kern[i, j] = (x[i] @ x[j] / math.sqrt((x[i] @ x[i]) * (x[j] @ x[j])) + 1) / 2
        return kern / kern.sum(1, keepdims=True)

    p_s, p_t = conditional(np_(student_emb)), conditional(np_(teacher_emb))
    return float(np.mean(p_t * np.log((p_t + eps) / (p_s + eps))))


def block_mean(x: np.ndarray, out: int) -> np.ndarray:
    """Area average of (..., H, W) down to (..., out, out), H a multiple of out."""
    f = x.shape[-1] // out
    return x.reshape(*x.shape[:-2], out, f, out, f).mean((-3, -1))


def bilinear_up(x: np.ndarray, out: int) -> np.ndarray:
    """Bilinear resampling with half-pixel centres (align_corners=False), written out."""
    n = x.shape[-1]

    def taps(o):
        src = max((o + 0.5) * n / out - 0.5, 0.0)
        i0 = int(math.floor(src))
        return i0, min(i0 + 1, n - 1), src - i0

    res = np.zeros(x.shape[:-2] + (out, out))
    for oh in range(out):
        h0, h1, wh = taps(oh)
        for ow in range(out):
            w0, w1, ww = taps(ow)
            res[..., oh, ow] = ((1 - wh) * ((1 - ww) * x[..., h0, w0] + ww * x[..., h0, w1])
                                + wh * ((1 - ww) * x[..., h1, w0] + ww * x[..., h1, w1]))
    return res


def resize(x: np.ndarray, out: int) -> np.ndarray:
    n = x.shape[-1]
    return x if n == out else block_mean(x, out) if n > out else bilinear_up(x, out)


def direct_at(student_stages, teacher_stages, which, p: float = 2.0) -> float:
    total = 0.0
    for i in which:
        s, t = np_(student_stages[i]), np_(teacher_stages[i])
        a_s = (s**p).mean(1)
        a_t = resize((t**p).mean(1), a_s.shape[-1])  # teacher map to the student's grid
        a_s, a_t = unit_rows(a_s.reshape(len(s), -1)), unit_rows(a_t.reshape(len(t), -1))
        total += float(((a_s - a_t) ** 2).mean())
    return total


def direct_sp(student_feat, teacher_feat) -> float:
    def gram(x):
        x = x.reshape(len(x), -1)
        return unit_rows(np.array([[x[i] @ x[j] for j in range(len(x))] for i in range(len(x))]))

    n = len(student_feat)
    return float(((gram(np_(student_feat)) - gram(np_(teacher_feat))) ** 2).sum() / n**2)


def project(linear: nn.Linear, x) -> np.ndarray:
    """normalize(W x + b), row by row."""
    return unit_rows(np_(x) @ np_(linear.weight).T + np_(linear.bias))


def direct_icd(z_s: np.ndarray, z_t: np.ndarray, scale: float, bias: float) -> tuple[float, float]:
    """(L_con, L_inv) from the logits matrix, element by element."""
    n = len(z_s)
    logits = np.array([[z_s[i] @ z_t[j] * scale + bias for j in range(n)] for i in range(n)])
    con = sum(logsumexp(logits[i]) - logits[i, i] for i in range(n)) / n
    inv = 0.0
    for i in range(n):
        for j in range(n):
            log_row = logits[i, j] - logsumexp(logits[i, :])  # softmax over row i
            log_col_t = logits[j, i] - logsumexp(logits[:, i])  # softmax(dim 0)^T: column i at row j
            inv += math.exp(log_col_t) * (log_col_t - log_row)
    return con, inv / n


def direct_nce(probs: np.ndarray, num_samples: int, eps: float = 1e-7) -> float:
    b, k1 = probs.shape
    noise = (k1 - 1) / num_samples  # K * P_n, P_n = 1/N
    total = 0.0
    for i in range(b):
        total += math.log(probs[i, 0] / (probs[i, 0] + noise + eps))
        for j in range(1, k1):
            total += math.log(noise / (probs[i, j] + noise + eps))
    return -total / b


def direct_masked_mse(s_tokens, t_tokens, valid) -> float:
    s, t, v = np_(s_tokens), np_(t_tokens), valid.numpy()
    per_token = [((s[b, n] - t[b, n]) ** 2).mean() for b in range(len(v)) for n in range(v.shape[1]) if v[b, n]]
    return float(sum(per_token) / len(per_token))


def direct_similarity(t_pool: np.ndarray, s_pool: np.ndarray, queue: np.ndarray, tau: float) -> float:
    def dist(x):
        cos = [x @ q / math.sqrt((x @ x) * (q @ q)) for q in queue]
        e = [math.exp(c / tau - max(cos) / tau) for c in cos]
        return np.array(e) / sum(e)

    return float(np.mean([1 - pearson_1d(dist(t_pool[b]), dist(s_pool[b])) for b in range(len(t_pool))]))


def student_pool(s_tokens, valid) -> np.ndarray:
    s, v = np_(s_tokens), valid.numpy()
    return unit_rows(np.stack([s[b][v[b]].mean(0) for b in range(len(v))]))


def assert_terms(terms: dict, expected: dict, rel: float = 1e-9) -> None:
    assert set(terms) == set(expected) | {"loss"}, sorted(terms)
    for key, value in expected.items():
        assert terms[key].item() == pytest.approx(value, rel=rel, abs=1e-12), key
    assert terms["loss"].item() == pytest.approx(sum(expected.values()), rel=rel, abs=1e-12)


# --------------------------------------------------------------------------- 1. each loss, directly

def test_kd_is_ce_plus_hinton_kl():
    student, teacher, labels, index = batch_for("kd")
    terms = build("kd")(student, teacher, labels, index)  # defaults: CE 0.1, KD 0.9, T 4
    assert_terms(terms, {"ce": 0.1 * direct_ce(student.logits, labels),
                         "kd": 0.9 * direct_kd(student.logits, teacher.logits, 4.0)})
    terms = build("kd", ce_weight=0.3, kd_weight=2.0, kd_temperature=1.5)(student, teacher, labels, index)
    assert_terms(terms, {"ce": 0.3 * direct_ce(student.logits, labels),
                         "kd": 2.0 * direct_kd(student.logits, teacher.logits, 1.5)})


@pytest.mark.parametrize("beta,gamma,tau", [(1.0, 1.0, 1.0), (2.0, 3.0, 4.0)])
def test_dist_inter_and_intra_pearson(beta, gamma, tau):
    student, teacher, labels, index = batch_for("dist")
    terms = build("dist", beta=beta, gamma=gamma, tau=tau)(student, teacher, labels, index)
    inter, intra = direct_dist(student.logits, teacher.logits, beta, gamma, tau)
    assert_terms(terms, {"ce": direct_ce(student.logits, labels), "inter": inter, "intra": intra})


def test_rkd_distance_and_angle_with_supervised_terms():
    student, teacher, labels, index = batch_for("rkd")
    dist, angle = direct_rkd(student.embedding, teacher.embedding)
    terms = build("rkd")(student, teacher, labels, index)  # 25 / 50, CE 1, no KD
    assert_terms(terms, {"ce": direct_ce(student.logits, labels), "rkd_distance": 25 * dist, "rkd_angle": 50 * angle})
    # base-class supervised terms: ce_weight scales CE, kd_weight > 0 adds Hinton's KD at kd_temperature
    terms = build("rkd", distance_weight=2.0, angle_weight=3.0, ce_weight=0.5, kd_weight=0.7,
                  kd_temperature=3.0)(student, teacher, labels, index)
    assert_terms(terms, {"ce": 0.5 * direct_ce(student.logits, labels),
                         "kd": 0.7 * direct_kd(student.logits, teacher.logits, 3.0),
                         "rkd_distance": 2 * dist, "rkd_angle": 3 * angle})


def test_vanilla_is_ce_only_and_needs_no_teacher():
    student, _, labels, index = batch_for("vanilla")
    assert_terms(build("vanilla")(student, NetOutputs(), labels, index), {"ce": direct_ce(student.logits, labels)})
    assert_terms(build("vanilla", ce_weight=0.5)(student, NetOutputs(), labels, index),
                 {"ce": 0.5 * direct_ce(student.logits, labels)})


@pytest.mark.parametrize("name", METHODS.names())
def test_method_reads_only_the_teacher_fields_it_declares(name):
    """The trainer may hand over only ``teacher_needs`` (vanilla: an empty NetOutputs)."""
    student, teacher, labels, index = batch_for(name)
    needs = method_class(name).teacher_needs
    assert needs <= {f.name for f in dataclasses.fields(NetOutputs)}, needs
    partial = NetOutputs(**{f: getattr(teacher, f) for f in needs})
    torch.manual_seed(100)  # CRD's negatives
    partial_terms = build(name)(student, partial, labels, index)
    torch.manual_seed(100)
    full_terms = build(name)(student, teacher, labels, index)
    assert {k: v.item() for k, v in partial_terms.items()} == {k: v.item() for k, v in full_terms.items()}


def test_ce_weight_zero_drops_the_ce_term():
    student, teacher, labels, index = batch_for("pkt")
    terms = build("pkt", ce_weight=0.0, weight=1.0)(student, teacher, labels, index)
    assert_terms(terms, {"pkt": direct_pkt(student.embedding, teacher.embedding)})


def test_pkt_cosine_kernel_kl():
    student, teacher, labels, index = batch_for("pkt")
    terms = build("pkt")(student, teacher, labels, index)
    assert_terms(terms, {"ce": direct_ce(student.logits, labels),
                         "pkt": 30_000 * direct_pkt(student.embedding, teacher.embedding)})


@pytest.mark.parametrize("stage", [2, 1, 3], ids=["same-size", "student-finer", "student-coarser"])
def test_fitnet_regressor_then_mse(stage):
    """Stage 2: 4x4 vs 4x4; stage 1: student 8x8 area-averaged to 4x4; stage 3: 2x2 upsampled to 4x4."""
    student, teacher, labels, index = batch_for("fitnet")
    method = build("fitnet", stage=stage, weight=3.0)
    terms = method(student, teacher, labels, index)
    hint = np_(method.regressor(student.stages[stage]))  # the learned regressor itself (train-mode BN)
    assert hint.shape[1] == TEACHER.stage_channels[stage]
    target = np_(teacher.stages[stage])
    expected = float(((resize(hint, T_SIZES[stage]) - target) ** 2).mean())
    assert_terms(terms, {"ce": direct_ce(student.logits, labels), "fitnet": 3.0 * expected})


def test_fitnet_regressor_is_applied():
    """Zeroing the regressor's BN scale/shift makes the hint exactly 0: loss = mean(t^2)."""
    student, teacher, labels, index = batch_for("fitnet")
    method = build("fitnet", weight=1.0, ce_weight=0.0)
    bn = [m for m in method.regressor.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bn, "FitNet's regressor lost its BN (CRD's ConvReg)"
    with torch.no_grad():
        bn[-1].weight.zero_()
        bn[-1].bias.zero_()
    terms = method(student, teacher, labels, index)
    assert terms["fitnet"].item() == pytest.approx(float((np_(teacher.stages[2]) ** 2).mean()), rel=1e-12)


def test_at_attention_maps_with_resized_teacher_maps():
    student, teacher, labels, index = batch_for("at")
    terms = build("at")(student, teacher, labels, index)  # stages 1, 2, 3; p = 2; weight 1000
    assert_terms(terms, {"ce": direct_ce(student.logits, labels),
                         "at": 1000 * direct_at(student.stages, teacher.stages, (1, 2, 3))})
    terms = build("at", stages=(0,), weight=1.0, ce_weight=0.0)(student, teacher, labels, index)
    assert_terms(terms, {"at": direct_at(student.stages, teacher.stages, (0,))})


def test_sp_similarity_preserving():
    student, teacher, labels, index = batch_for("sp")
    terms = build("sp")(student, teacher, labels, index)  # last stage, weight 3000
    assert_terms(terms, {"ce": direct_ce(student.logits, labels),
                         "sp": 3000 * direct_sp(student.stages[-1], teacher.stages[-1])})
    terms = build("sp", stages=(0, 3), weight=1.0, ce_weight=0.0)(student, teacher, labels, index)
    expected = direct_sp(student.stages[0], teacher.stages[0]) + direct_sp(student.stages[3], teacher.stages[3])
    assert_terms(terms, {"sp": expected})


def test_icd_contrastive_and_invariance_terms_with_kd():
    student, teacher, labels, index = batch_for("icd")
    method = build("icd", tau_init=0.5, bias_init=0.2, alpha=0.3, beta=0.7, ce_weight=0.6, kd_weight=1.0)
    terms = method(student, teacher, labels, index)
    z_s, z_t = project(method.embed_s, student.embedding), project(method.embed_t, teacher.embedding)
    con, inv = direct_icd(z_s, z_t, math.exp(0.5), 0.2)
    assert_terms(terms, {"ce": 0.6 * direct_ce(student.logits, labels),
                         "kd": direct_kd(student.logits, teacher.logits, 4.0),  # kd_weight=1: ICD+KD
                         "icd_con": 0.7 * con, "icd_inv": 0.7 * 0.3 * inv})


def test_icd_defaults():
    student, teacher, labels, index = batch_for("icd")
    method = build("icd")
    terms = method(student, teacher, labels, index)
    z_s, z_t = project(method.embed_s, student.embedding), project(method.embed_t, teacher.embedding)
    con, inv = direct_icd(z_s, z_t, math.e, 0.0)  # tau0 = 1, b0 = 0, alpha 0.5, beta 1, no KD
    assert_terms(terms, {"ce": direct_ce(student.logits, labels), "icd_con": con, "icd_inv": 0.5 * inv})


def test_crd_nce_loss_formula():
    g = torch.Generator().manual_seed(3)
    probs = torch.rand(4, 9, generator=g, dtype=torch.float64) * 0.3
    for n in (10, 1000):
        assert nce_loss(probs, n).item() == pytest.approx(direct_nce(np_(probs), n), rel=1e-12)


def test_crd_full_objective():
    student, teacher, labels, index = batch_for("crd")
    method = build("crd", temperature=0.1, momentum=0.5, weight=0.8)
    mem = method.memory
    bank_s, bank_t = np_(mem.bank_student), np_(mem.bank_teacher)
    g = torch.Generator().manual_seed(5)
    idx = torch.cat([index.unsqueeze(1), torch.randint(0, NUM_SAMPLES, (B, 16), generator=g)], 1)
    method.contrast_indices = lambda index_b: idx  # fixed negatives
    terms = method(student, teacher, labels, index)
    v_s, v_t = project(method.embed_s, student.embedding), project(method.embed_t, teacher.embedding)

    def probs(v, bank):
        out = np.array([[math.exp(bank[idx[b, k]] @ v[b] / 0.1) for k in range(17)] for b in range(B)])
        z = out.mean() * NUM_SAMPLES  # first call: Z from this batch
        return out / z, z

    p_t, z_student_bank = probs(v_t, bank_s)  # teacher embedding against the student bank
    p_s, z_teacher_bank = probs(v_s, bank_t)
    crd = direct_nce(p_s, NUM_SAMPLES) + direct_nce(p_t, NUM_SAMPLES)
    assert_terms(terms, {"ce": direct_ce(student.logits, labels), "crd": 0.8 * crd})
    assert mem.z_student.item() == pytest.approx(z_student_bank, rel=1e-12)
    assert mem.z_teacher.item() == pytest.approx(z_teacher_bank, rel=1e-12)


def hsakd_expected(method, student, teacher, labels, temperature=3.0, ce_weight=1.0):
    branch = sum(direct_kd(br(feat), t_logits, temperature)
                 for br, feat, t_logits in zip(method.branches, student.stages, teacher.branch_logits))
    unrot = student.logits[0::4]
    return {"ce": ce_weight * direct_ce(unrot, labels), "branch_kl": branch,
            "logit_kl": direct_kd(student.logits, teacher.logits, temperature)}


def test_hsakd_total():
    student, teacher, labels, index = batch_for("hsakd")
    method = build("hsakd")
    terms = method(student, teacher, labels, index)
    assert len(method.branches) == len(STUDENT.stage_channels)
    assert [br(f).shape for br, f in zip(method.branches, student.stages)] == [(4 * B, 4 * K)] * 4
    assert_terms(terms, hsakd_expected(method, student, teacher, labels))
    method = build("hsakd", temperature=2.0, ce_weight=0.5)
    assert_terms(method(student, teacher, labels, index),
                 hsakd_expected(method, student, teacher, labels, temperature=2.0, ce_weight=0.5))


def test_hgkd_masked_mse_and_similarity_queue_pushed_first():
    (s1, t1, _, _), (s2, t2, _, _) = batch_for("hgkd", seed=0), batch_for("hgkd", seed=1)
    method = build("hgkd", tau=0.2)
    terms = method(s1, t1, None, None)
    queue = unit_rows(np_(t1.pooled))  # the batch is enqueued before the comparison
    sim = direct_similarity(np_(t1.pooled), student_pool(s1.tokens, t1.valid), queue, 0.2)
    assert_terms(terms, {"mse": direct_masked_mse(s1.tokens, t1.tokens, t1.valid), "sim": sim}, rel=1e-5)
    terms = method(s2, t2, None, None)
    queue = np.concatenate([queue, unit_rows(np_(t2.pooled))])
    assert int(method.queue.filled) == 2 * B
    sim = direct_similarity(np_(t2.pooled), student_pool(s2.tokens, t2.valid), queue, 0.2)
    assert_terms(terms, {"mse": direct_masked_mse(s2.tokens, t2.tokens, t2.valid), "sim": sim}, rel=1e-5)


def test_class_hooks_give_options_and_queue_prefill():
    """What the trainer asks a method (issue 14): its config-fed options and its pre-fill size."""
    cfg = DistillConfig(method="hgkd", queue_size=7, tau=0.1, similarity=False, sim_weight=2.0)
    assert method_options("hgkd", cfg, {"tau": 0.2}) == {"similarity": False, "queue_size": 7, "tau": 0.2,
                                                         "sim_weight": 2.0}
    assert method_options("kd", cfg, {"kd_weight": 1.0}) == {"kd_weight": 1.0}
    assert build("hgkd", queue_size=7).prefill_size() == 7
    assert build("hgkd", queue_size=7, similarity=False).prefill_size() == 0  # no L_sim: no queue to fill
    assert [n for n in METHODS.names() if build(n).prefill_size()] == ["hgkd"]
    assert [n for n in METHODS.names() if not method_class(n).supervised] == ["hgkd"]
    for name in METHODS.names():  # every config-fed option is a DistillConfig field and a factory option
        assert set(method_class(name).config_options) <= {f.name for f in dataclasses.fields(DistillConfig)}
        create_method(name, CTX, **method_options(name, DistillConfig(method=name), {}))


def test_hgkd_prefill_default_tau_and_sim_weight():
    student, teacher, _, _ = batch_for("hgkd", seed=2)
    prefill = torch.randn(5, TEACHER.embed_dim, generator=torch.Generator().manual_seed(9))
    # at the paper's tau the queue softmax is nearly one-hot: a student close to the teacher
    # would give L_sim ~ 1e-7, so take one whose pooled embedding is far from the teacher's
    noise = torch.randn(teacher.tokens.shape, generator=torch.Generator().manual_seed(4))
    student.tokens = teacher.tokens + 3.0 * noise
    method = build("hgkd", sim_weight=0.5, tau=0.009)  # paper tau
    method.prefill(prefill)
    terms = method(student, teacher, None, None)
    queue = np.concatenate([unit_rows(np_(prefill)), unit_rows(np_(teacher.pooled))])
    mse = direct_masked_mse(student.tokens, teacher.tokens, teacher.valid)
    sim = direct_similarity(np_(teacher.pooled), student_pool(student.tokens, teacher.valid), queue, 0.009)
    assert terms["mse"].item() == pytest.approx(mse, rel=1e-5)
    assert sim > 0.05
    assert terms["sim"].item() == pytest.approx(0.5 * sim, rel=1e-4, abs=1e-6)  # logged weighted
    assert terms["loss"].item() == pytest.approx(mse + 0.5 * sim, rel=1e-4)


def test_hgkd_without_similarity_is_masked_mse_only():
    student, teacher, _, _ = batch_for("hgkd", seed=3)
    method = build("hgkd", similarity=False)
    terms = method(student, teacher, None, None)
    assert set(terms) == {"mse", "loss"}
    assert terms["loss"].item() == pytest.approx(direct_masked_mse(student.tokens, teacher.tokens, teacher.valid),
                                                 rel=1e-5)
    assert int(method.queue.filled) == 0
    assert not build("hgkd").supervised


# Non-default weights: "loss" must be the sum of the (already weighted) terms for every method.
WEIGHTED = {"kd": {"ce_weight": 0.3, "kd_weight": 0.6}, "dist": {"beta": 2.0, "gamma": 3.0, "ce_weight": 0.5},
            "rkd": {"distance_weight": 2.0, "angle_weight": 3.0, "ce_weight": 0.5, "kd_weight": 0.4},
            "pkt": {"weight": 5.0, "kd_weight": 0.5}, "fitnet": {"weight": 2.0, "ce_weight": 0.5},
            "at": {"weight": 7.0, "kd_weight": 0.3}, "sp": {"weight": 11.0, "ce_weight": 0.2},
            "icd": {"beta": 0.7, "alpha": 0.3, "kd_weight": 1.0}, "crd": {"weight": 0.5, "kd_weight": 0.5},
            "hsakd": {"ce_weight": 0.5}, "hgkd": {"sim_weight": 0.5}, "vanilla": {"ce_weight": 0.5}}


@pytest.mark.parametrize("name", METHODS.names())
def test_loss_is_the_sum_of_the_weighted_terms(name):
    assert name in WEIGHTED, f"add non-default weights for {name!r} to WEIGHTED"
    method = build(name, **WEIGHTED[name])
    terms = method(*batch_for(name))
    parts = [v.item() for k, v in terms.items() if k != "loss"]
    assert len(parts) >= 1
    assert terms["loss"].item() == pytest.approx(sum(parts), rel=1e-6), \
        f"{name}: loss {terms['loss'].item()} != sum of logged terms {sum(parts)} ({sorted(terms)})"


# --------------------------------------------------------------------------- 2. regression fixture

def fixture_values() -> dict[str, list[dict[str, float]]]:
    """Every method's terms on two consecutive seeded batches (second call: CRD's kept Z and
    updated banks, H-GKD's grown queue)."""
    values = {}
    for name in METHODS.names():
        method = build(name)
        calls = []
        for seed in (0, 1):
            torch.manual_seed(100 + seed)  # CRD's negatives
            terms = method(*batch_for(name, seed=seed))
            calls.append({k: float(v.detach()) for k, v in sorted(terms.items())})
        values[name] = calls
    return values


def write_fixture() -> None:
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_text(json.dumps(fixture_values(), indent=2, sort_keys=True) + "\n")


@lru_cache(maxsize=1)
def stored_fixture() -> dict:
    if os.environ.get(REGEN_ENV) == "1":
        write_fixture()
    return json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("name", METHODS.names())
def test_regression_fixture(name):
    stored = stored_fixture()
    assert name in stored, f"no fixture entry for {name!r}: run {REGEN_ENV}=1 pytest {__file__} -k regression"
    method = build(name)
    rel = 1e-5 if name == "hgkd" else 1e-9  # H-GKD computes in float32
    for seed, expected in zip((0, 1), stored[name]):
        torch.manual_seed(100 + seed)
        terms = {k: float(v.detach()) for k, v in method(*batch_for(name, seed=seed)).items()}
        assert set(terms) == set(expected), (name, seed)
        for key in expected:
            assert terms[key] == pytest.approx(expected[key], rel=rel, abs=1e-12), (name, seed, key)


def test_fixture_has_no_stale_entries():
    assert set(stored_fixture()) == set(METHODS.names())


# --------------------------------------------------------------------------- 3. HSAKD bookkeeping

def test_rotate_batch_interleaves_the_four_rotations():
    n = 3
    images = torch.arange(2 * 2 * n * n, dtype=torch.float64).view(2, 2, n, n)  # asymmetric
    out = rotate_batch(images)
    assert out.shape == (8, 2, n, n)
    for i in range(2):
        for c in range(2):
            for h in range(n):
                for w in range(n):
                    x = images[i, c]
                    assert out[4 * i + 0, c, h, w] == x[h, w]
                    assert out[4 * i + 1, c, h, w] == x[w, n - 1 - h]  # 90 degrees (np.rot90 direction)
                    assert out[4 * i + 2, c, h, w] == x[n - 1 - h, n - 1 - w]  # 180
                    assert out[4 * i + 3, c, h, w] == x[n - 1 - w, h]  # 270
    with pytest.raises(HgkdError, match="square"):
        rotate_batch(torch.zeros(1, 3, 4, 5))


def test_joint_labels_and_unrotated_rows():
    y = torch.tensor([2, 0, 4])
    assert joint_labels(y).tolist() == [4 * label + r for label in (2, 0, 4) for r in range(4)]
    images = torch.randn(3, 2, 4, 4)
    torch.testing.assert_close(unrotated(rotate_batch(images)), images)
    assert unrotated(torch.arange(12)).tolist() == [0, 4, 8]


def test_hsakd_prepare_shapes():
    method = build("hsakd")
    images, labels = torch.randn(2, 3, 8, 8), torch.tensor([1, 3])
    rotated, out_labels = method.prepare(images, labels)
    assert rotated.shape == (8, 3, 8, 8)
    assert out_labels.tolist() == [1, 3]  # CE is on the unrotated rows, with the original labels
    for name in set(METHODS.names()) - {"hsakd"}:
        same, same_labels = build(name).prepare(images, labels)
        assert same is images and same_labels is labels


def test_hsakd_needs_one_teacher_branch_per_student_branch():
    student, teacher, labels, index = batch_for("hsakd")
    teacher.branch_logits = teacher.branch_logits[:3]
    with pytest.raises(HgkdError, match="auxiliary branches"):
        build("hsakd")(student, teacher, labels, index)


# --------------------------------------------------------------------------- 4. ICD's scale and bias

def icd_inputs(method):
    student, teacher, labels, index = batch_for("icd")
    z_s = F.normalize(method.embed_s(student.embedding), dim=1)
    z_t = F.normalize(method.embed_t(teacher.embedding), dim=1)
    return student, teacher, labels, index, z_s, z_t


def test_icd_scale_is_clamped_and_gets_no_gradient_when_clamped():
    method = build("icd", tau_init=math.log(10.0) + 1.0, max_scale=10.0)  # exp(tau) = 27 > 10
    *_, z_s, z_t = icd_inputs(method)
    logits = method.objective.logits(z_s, z_t)
    torch.testing.assert_close(logits, (z_s @ z_t.T) * 10.0, rtol=0, atol=1e-14)
    method(*batch_for("icd"))["loss"].backward()
    assert method.objective.tau.grad is not None and method.objective.tau.grad.item() == 0.0
    con, inv = direct_icd(np_(z_s), np_(z_t), 10.0, 0.0)
    c, i = method.objective(z_s, z_t)
    assert (c.item(), i.item()) == pytest.approx((con, inv), rel=1e-10)


def test_icd_tau_and_bias_are_trained_parameters():
    method = build("icd", tau_init=0.5, bias_init=0.3)
    params = dict(method.named_parameters())
    assert isinstance(method.objective.tau, nn.Parameter) and isinstance(method.objective.bias, nn.Parameter)
    assert params["objective.tau"] is method.objective.tau and params["objective.bias"] is method.objective.bias
    method(*batch_for("icd"))["loss"].backward()
    assert method.objective.tau.grad is not None and abs(method.objective.tau.grad.item()) > 1e-6
    # softmax over rows and over columns are both shift-invariant: b cannot change the loss,
    # so its gradient is (mathematically) zero
    assert method.objective.bias.grad is not None and abs(method.objective.bias.grad.item()) < 1e-12


def test_icd_bias_shifts_every_logit_and_leaves_both_terms_unchanged():
    method = build("icd", tau_init=0.5, bias_init=0.0)
    *_, z_s, z_t = icd_inputs(method)
    base_logits = method.objective.logits(z_s, z_t)
    base = method.objective(z_s, z_t)
    with torch.no_grad():
        method.objective.bias.fill_(1.7)
    torch.testing.assert_close(method.objective.logits(z_s, z_t) - base_logits,
                               torch.full_like(base_logits, 1.7), rtol=0, atol=1e-12)
    shifted = method.objective(z_s, z_t)
    assert shifted[0].item() == pytest.approx(base[0].item(), rel=1e-12)  # CE: row softmax
    assert shifted[1].item() == pytest.approx(base[1].item(), rel=1e-9, abs=1e-14)  # KL(col^T || row)
    # the scale does matter
    with torch.no_grad():
        method.objective.tau.fill_(1.5)
    assert method.objective(z_s, z_t)[0].item() != pytest.approx(base[0].item(), rel=1e-6)


# --------------------------------------------------------------------------- 5. CRD's memory

def test_crd_contrast_indices_positive_first():
    method = build("crd", negatives=7)
    index = torch.tensor([3, 0, 19, 5])
    idx = method.contrast_indices(index)
    assert idx.shape == (4, 8)
    assert idx[:, 0].tolist() == [3, 0, 19, 5]
    assert int(idx.min()) >= 0 and int(idx.max()) < NUM_SAMPLES


def test_crd_bank_momentum_update_and_constants_kept():
    method = build("crd", momentum=0.3)
    mem = method.memory
    student, teacher, labels, index = batch_for("crd")
    old_s, old_t = mem.bank_student.clone(), mem.bank_teacher.clone()
    assert mem.z_student.item() < 0 and mem.z_teacher.item() < 0  # unset
    method(student, teacher, labels, index)
    v_s, v_t = project(method.embed_s, student.embedding), project(method.embed_t, teacher.embedding)
    others = [i for i in range(NUM_SAMPLES) if i not in set(index.tolist())]
    for bank, old, v in ((mem.bank_student, old_s, v_s), (mem.bank_teacher, old_t, v_t)):
        expected = unit_rows(0.3 * np_(old[index]) + 0.7 * v)
        np.testing.assert_allclose(np_(bank[index]), expected, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(bank[others], old[others], rtol=0, atol=0)
    z = (mem.z_student.item(), mem.z_teacher.item())
    assert z[0] > 0 and z[1] > 0
    method(*batch_for("crd", seed=1))
    assert (mem.z_student.item(), mem.z_teacher.item()) == z  # set once, on the first call


# --------------------------------------------------------------------------- 6. gradients

# The student tensors each method's loss must reach (a new method needs an entry).
STUDENT_USES = {
    "kd": ["logits"], "dist": ["logits"], "rkd": ["logits", "embedding"], "pkt": ["logits", "embedding"],
    "fitnet": ["logits", "stages.2"], "at": ["logits", "stages.1", "stages.2", "stages.3"],
    "sp": ["logits", "stages.3"], "icd": ["logits", "embedding"], "crd": ["logits", "embedding"],
    "hsakd": ["logits", "stages.0", "stages.1", "stages.2", "stages.3"], "hgkd": ["tokens"], "vanilla": ["logits"]}


@pytest.mark.parametrize("name", METHODS.names())
def test_loss_reaches_the_student_and_the_method_modules(name):
    assert name in STUDENT_USES, f"say which student outputs {name!r} trains in STUDENT_USES"
    method = build(name)
    student, teacher, labels, index = batch_for(name, grad=True)
    method(student, teacher, labels, index)["loss"].backward()
    tensors = named_tensors(student)
    for field in STUDENT_USES[name]:
        grad = tensors[field].grad
        assert grad is not None, f"{name}: no gradient reaches student.{field}"
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, f"{name}: student.{field}"
    for field, t in tensors.items():
        assert t.grad is None or torch.isfinite(t.grad).all(), f"{name}: student.{field}"
    for pname, p in method.named_parameters():  # fitnet regressor, icd/crd projections, hsakd branches
        assert p.grad is not None, f"{name}: parameter {pname} gets no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: parameter {pname}"
        if pname != "objective.bias":  # ICD's bias: zero gradient (shift invariance, see above)
            assert p.grad.abs().sum() > 0, f"{name}: parameter {pname} has an all-zero gradient"


@pytest.mark.parametrize("name", METHODS.names())
def test_no_gradient_reaches_the_teacher(name):
    """The teacher is frozen: even when handed tensors with autograd history, no method may
    back-propagate into them (the method detaches, or computes under no_grad)."""
    method = build(name)
    student, teacher, labels, index = batch_for(name, grad=True)
    method(student, teacher, labels, index)["loss"].backward()
    leaked = sorted(f for f, t in named_tensors(teacher).items() if t.grad is not None)
    assert not leaked, f"{name}: gradient flows into teacher.{leaked}"


def test_supervised_kd_term_does_not_reach_the_teacher():
    """The base class's KD term (ICD+KD, CRD+KD, ...) under the same rule."""
    method = build("icd", kd_weight=1.0)
    student, teacher, labels, index = batch_for("icd", grad=True)
    method(student, teacher, labels, index)["loss"].backward()
    assert teacher.logits.grad is None, "DistillMethod.supervised_terms: KD back-propagates into teacher.logits"


# --------------------------------------------------------------------------- options

@pytest.mark.parametrize("name", METHODS.names())
def test_unknown_option_is_a_user_error(name):
    with pytest.raises(HgkdError, match="--method-opt"):
        create_method(name, CTX, no_such_option=1)


def test_crd_without_sample_count_is_a_user_error():
    with pytest.raises(HgkdError, match="number of training images"):
        create_method("crd", MethodContext(student=STUDENT, teacher=TEACHER))


def test_icd_bad_max_scale_is_a_user_error():
    """A bad --method-opt value is a user mistake: HgkdError (one line, exit 2), not a traceback."""
    with pytest.raises(HgkdError):
        create_method("icd", CTX, max_scale=0.0)


if __name__ == "__main__":
    write_fixture()
    print(f"wrote {FIXTURE}")
