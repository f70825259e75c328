"""Secure aggregation (Bonawitz et al. 2017): correctness, dropouts, aborts, rejected messages, privacy."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from fedtensor.errors import FedtensorError
from fedtensor.federated.secagg import (
    FixedPoint,
    MaskedInput,
    RandomSource,
    SecAggAbort,
    SecAggClient,
    SecAggError,
    SecAggMessageError,
    SecAggParams,
    SecAggServer,
    ShareForward,
    UnmaskRequest,
    decode,
    encode,
    secure_aggregate,
    secure_sum,
    wire_size,
)
from fedtensor.federated.secagg import primitives as P
from fedtensor.federated.secagg import shamir

# --------------------------------------------------------------------------------------------------
# helpers: drive the protocol by hand
# --------------------------------------------------------------------------------------------------


def make_params(n=5, t=3, m=64, *, round_id=1, weighted=False, max_total_weight=None, clip=4.0, scale=None):
    fp = FixedPoint.auto(clip, n, max_total_weight if weighted else None) if scale is None else FixedPoint(scale, clip)
    return SecAggParams(round_id, n, t, m, fp, weighted=weighted, max_total_weight=max_total_weight)


class Run:
    """A server and n clients (ids 1..n) with deterministic randomness, advanced round by round."""

    def __init__(self, params: SecAggParams, seed=0):
        self.p = params
        self.ids = list(range(1, params.num_clients + 1))
        self.server = SecAggServer(params, self.ids)
        self.clients = {i: SecAggClient(i, params, rng=RandomSource(seed, f"{params.round_id}-{i}")) for i in self.ids}

    def round0(self, skip=()):
        for i in self.ids:
            if i not in skip:
                self.server.receive_advertise(self.clients[i].advertise_keys())
        self.keys = self.server.broadcast_keys()

    def round1(self, skip=()):
        self.share_msgs = {}
        for k in self.keys.clients:
            if k.sender not in skip:
                self.share_msgs[k.sender] = self.clients[k.sender].share_keys(self.keys)
                self.server.receive_shares(self.share_msgs[k.sender])
        self.forwards = self.server.forward_shares()

    def round2(self, xs, skip=(), weights=None):
        self.masked = {}
        for v in self.forwards:
            if v not in skip:
                w = None if weights is None else weights[v]
                self.masked[v] = self.clients[v].mask_input(self.forwards[v], xs[v], w)
                self.server.receive_masked_input(self.masked[v])
        self.request = self.server.unmask_request()

    def through(self, last: int, xs=None, skip=(), weights=None):
        """Rounds 0 … ``last`` (at most 2) with every client; ``skip``: who sends nothing in round 2."""
        assert last in (0, 1, 2) and (last == 2 or (xs is None and not skip and weights is None))
        self.round0()
        if last >= 1:
            self.round1()
        if last >= 2:
            self.round2(xs, skip=skip, weights=weights)
        return self

    def round3(self, skip=()):
        for u in self.request.survivors:
            if u not in skip:
                self.server.receive_unmask(self.clients[u].unmask(self.request))
        return self.server.finalize()


def inputs(ids, m, seed=0, lo=-1.0, hi=1.0):
    rng = np.random.default_rng(seed)
    return {i: rng.uniform(lo, hi, m) for i in ids}


def started(last: int, *, skip=(), **params):
    """``(params, run, x)``: a run of :func:`make_params` ``params`` through round ``last`` (see
    :meth:`Run.through`), the clients holding :func:`inputs`."""
    p = make_params(**params)
    run = Run(p)
    x = inputs(run.ids, p.vector_length)
    run.through(last, x if last == 2 else None, skip=skip)
    return p, run, x


# --------------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------------


def test_errors_are_fedtensor_errors():
    assert issubclass(SecAggAbort, SecAggError) and issubclass(SecAggMessageError, SecAggError)
    assert issubclass(SecAggError, FedtensorError)
    from fedtensor import federated

    assert federated.secure_sum is secure_sum and federated.SecAggAbort is SecAggAbort


def test_shamir_threshold_and_consistency():
    rng = RandomSource(1, "shamir")
    secret = os.urandom(32)
    xs = [3, 7, 11, 12, 40]
    sh = shamir.split(secret, 3, xs, rng)
    assert all(len(s) == shamir.SHARE_BYTES for s in sh.values())
    for subset in ([3, 7, 11], [7, 12, 40], [3, 11, 12, 40], xs):
        assert shamir.combine({x: sh[x] for x in subset}, 3) == secret
    with pytest.raises(SecAggError, match="need 3"):
        shamir.combine({3: sh[3], 7: sh[7]}, 3)
    # a wrong share anywhere is detected; no party is named (it cannot be told which share is wrong, nor
    # whether its holder or the dealer is to blame: naming one blamed honest clients)
    for wrong in xs:
        bad = dict(sh)
        bad[wrong] = bytes([sh[wrong][0] ^ 1]) + sh[wrong][1:]
        with pytest.raises(SecAggError, match="inconsistent") as e:
            shamir.combine(bad, 3)
        assert "party" not in str(e.value)
    with pytest.raises(SecAggError, match="32 bytes"):
        shamir.split(b"short", 3, xs, rng)


def test_prg_chunked_mask_matches_reference():
    seeds = [os.urandom(16) for _ in range(5)]
    for m in (1, 7, 100, 1000):
        acc = np.arange(m, dtype=P.WORD)
        ref = acc.copy()
        for s in seeds[:3]:
            ref += P.prg_words(s, m)
        for s in seeds[3:]:
            ref -= P.prg_words(s, m)
        P.add_masks(acc, seeds[:3], seeds[3:], chunk_words=13)
        assert np.array_equal(acc, ref)


def test_fixed_point_bounds():
    fp = FixedPoint.auto(4.0, 10)
    fp.check_capacity(10)
    with pytest.raises(SecAggError, match="overflow"):
        FixedPoint(fp.scale * 2, 4.0).check_capacity(10)
    with pytest.raises(SecAggError, match="overflow"):
        make_params(n=10, t=6, clip=4.0, scale=2.0**26)
    with pytest.raises(SecAggError, match="clip"):
        fp.encode(np.array([0.0, -4.5]))
    with pytest.raises(SecAggError, match="NaN"):
        fp.encode(np.array([np.nan]))
    x = np.array([-4.0, -1e-3, 0.0, 2.5, 4.0])
    q = fp.encode(x, 3)
    assert np.all(np.abs(fp.decode_sum(q) - 3 * x) <= 0.5 / fp.scale)


def test_message_encoding_roundtrip():
    log: list = []
    secure_aggregate([np.zeros(10), np.ones(10), np.ones(10)], threshold=2, seed=3, dropouts_after_masking=[1], transcript=log)
    kinds = set()
    for _, m in log:
        b = encode(m)
        assert len(b) == wire_size(m) and decode(b) == m
        kinds.add(type(m).__name__)
    assert {"AdvertiseKeys", "KeyBroadcast", "ShareKeys", "MaskedInput", "UnmaskRequest", "UnmaskResponse"} <= kinds
    for junk in (b"", b"FSA1", b"XXXX\x01", encode(log[0][1])[:-1], encode(log[0][1]) + b"\0"):
        with pytest.raises(SecAggMessageError):
            decode(junk)


# --------------------------------------------------------------------------------------------------
# correctness
# --------------------------------------------------------------------------------------------------


@st.composite
def _cases(draw):
    n = draw(st.integers(2, 7))
    t = draw(st.integers(max(2, n // 2 + 1), n))
    m = draw(st.integers(1, 200))
    mag = draw(st.sampled_from([1e-4, 1e-2, 1.0, 50.0]))
    scale_shift = draw(st.integers(-12, 0))  # 0: largest safe scale
    weighted = draw(st.booleans())
    drops = draw(st.lists(st.integers(0, n - 1), unique=True, max_size=n - t))
    seed = draw(st.integers(0, 2**32))
    return n, t, m, mag, scale_shift, weighted, drops, seed


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_cases())
def test_masked_aggregate_equals_plain_sum(case):
    n, t, m, mag, scale_shift, weighted, drops, seed = case
    rng = np.random.default_rng(seed)
    ups = [rng.uniform(-mag, mag, m).astype(rng.choice([np.float32, np.float64])) for _ in range(n)]
    ws = [int(w) for w in rng.integers(0, 500, n)] if weighted else None
    total = max(1, sum(ws)) if weighted else n
    scale = FixedPoint.auto(mag, n, total).scale * 2.0**scale_shift
    res = secure_aggregate(ups, threshold=t, weights=ws, dropouts_after_masking=drops, seed=seed, clip=mag, scale=scale)
    alive = [i for i in range(n) if i not in drops]
    assert res.survivors == tuple(i + 1 for i in alive) and res.dropped == tuple(sorted(i + 1 for i in drops))
    w = ws if weighted else [1] * n
    ref = sum(w[i] * ups[i].astype(np.float64) for i in alive)
    tol = len(alive) / (2 * scale)
    assert res.tolerance == pytest.approx(tol)
    assert np.max(np.abs(res.sum - ref)) <= tol * (1 + 1e-9)
    if weighted:
        assert res.total_weight == sum(ws[i] for i in alive)
        if res.total_weight:
            assert np.max(np.abs(res.mean - ref / res.total_weight)) <= tol / res.total_weight * (1 + 1e-9)


def test_secure_sum_shapes_dtypes_and_fedavg_mean():
    rng = np.random.default_rng(5)
    ups = [rng.normal(0, 0.1, (3, 4, 5)).astype(np.float32) for _ in range(4)]
    s = secure_sum(ups, threshold=3, seed=1)
    assert s.shape == (3, 4, 5) and s.dtype == np.float32
    np.testing.assert_allclose(s, np.sum(ups, axis=0, dtype=np.float64), atol=1e-6)
    w = [100, 1, 50, 7]
    mean = secure_sum(ups, threshold=3, weights=w, dropouts_after_masking=[2])
    ref = (100 * ups[0].astype(np.float64) + ups[1] + 7 * ups[3].astype(np.float64)) / 108
    np.testing.assert_allclose(mean, ref, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# dropouts and aborts
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("drops", [(), (0,), (1, 4), (0, 3, 7)])
def test_up_to_n_minus_t_dropouts_after_masking(drops):
    n, t, m = 8, 5, 300
    ups = [np.random.default_rng(i).uniform(-2, 2, m) for i in range(n)]
    res = secure_aggregate(ups, threshold=t, dropouts_after_masking=drops, seed=11, clip=2.0)
    ref = sum(ups[i] for i in range(n) if i not in drops)
    assert np.max(np.abs(res.sum - ref)) <= res.tolerance


def test_dropouts_at_every_stage():
    """Client 2 never shares keys, 5 never sends its masked input, 7 never answers the unmasking."""
    p = make_params(n=8, t=5, m=50)
    run = Run(p)
    xs = inputs(run.ids, p.vector_length)
    run.round0()
    run.round1(skip={2})
    assert 2 not in run.forwards and run.forwards[1].participants == (1, 3, 4, 5, 6, 7, 8)
    run.round2(xs, skip={5})
    assert run.request.survivors == (1, 3, 4, 6, 7, 8) and run.request.dropped == (5,)
    res = run.round3(skip={7})
    ref = sum(xs[i] for i in (1, 3, 4, 6, 7, 8))
    assert np.max(np.abs(res.sum - ref)) <= res.tolerance


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_fewer_than_t_survivors_aborts(stage):
    p = make_params(n=5, t=4, m=20)
    run = Run(p)
    xs = inputs(run.ids, p.vector_length)
    gone = {2, 3}
    with pytest.raises(SecAggAbort) as ei:
        run.round0(skip=gone if stage == 0 else ())
        run.round1(skip=gone if stage == 1 else ())
        run.round2(xs, skip=gone if stage == 2 else ())
        run.round3(skip=gone if stage == 3 else ())
    msg = str(ei.value)
    assert "\n" not in msg and "threshold is 4" in msg
    assert isinstance(ei.value, FedtensorError)
    with pytest.raises(SecAggAbort):  # an aborted server refuses to go on
        run.server.finalize()


def test_secure_sum_aborts_below_threshold():
    ups = [np.zeros(10)] * 5
    with pytest.raises(SecAggAbort, match="only 2 clients sent masked inputs, threshold is 3"):
        secure_sum(ups, threshold=3, dropouts_after_masking=[0, 1, 2])
    with pytest.raises(SecAggAbort, match="only 2 clients answered"):
        secure_sum(ups, threshold=3, dropouts_after_masking=[0], dropouts_during_unmasking=[1, 2])
    with pytest.raises(SecAggAbort, match="exceeds the 5 clients"):
        secure_sum(ups, threshold=6)


# --------------------------------------------------------------------------------------------------
# rejected messages
# --------------------------------------------------------------------------------------------------


def _with_share(fwd: ShareForward, k: int, **changes) -> ShareForward:
    shares = list(fwd.shares)
    shares[k] = dataclasses.replace(shares[k], **changes)
    return dataclasses.replace(fwd, shares=tuple(shares))


def test_tampered_share_ciphertext_is_rejected():
    _, run, x = started(1, n=4, t=3, m=16)
    fwd = run.forwards[2]
    ct = fwd.shares[0].ciphertext
    flipped = ct[:5] + bytes([ct[5] ^ 0x40]) + ct[6:]
    for bad in (
        _with_share(fwd, 0, ciphertext=flipped),
        _with_share(fwd, 0, nonce=bytes(12)),
        _with_share(fwd, 1, ciphertext=fwd.shares[1].ciphertext[:-1] + b"\0"),
    ):
        with pytest.raises(SecAggMessageError, match="failed AES-GCM authentication"):
            run.clients[2].mask_input(bad, x[2])
    # the rejection left the client intact: the genuine message still works
    assert isinstance(run.clients[2].mask_input(fwd, x[2]), MaskedInput)


def test_share_for_wrong_pair_or_round_is_rejected():
    p, run, x = started(1, n=4, t=3, m=16, round_id=7)
    to2, to3 = run.forwards[2], run.forwards[3]
    # a share addressed to client 3 delivered to client 2
    with pytest.raises(SecAggMessageError, match="addressed to client 3"):
        run.clients[2].mask_input(dataclasses.replace(to2, shares=(to3.shares[0],) + to2.shares[1:]), x[2])
    # ... relabelled to look like it is for client 2: the AEAD binding catches it
    relabelled = dataclasses.replace(to3.shares[0], recipient=2)
    with pytest.raises(SecAggMessageError, match="AES-GCM"):
        run.clients[2].mask_input(dataclasses.replace(to2, shares=(relabelled,) + to2.shares[1:]), x[2])
    # a share claiming another sender
    s0 = to2.shares[0]
    other = next(e.sender for e in to2.shares if e.sender != s0.sender)
    with pytest.raises(SecAggMessageError):
        run.clients[2].mask_input(_with_share(to2, 0, sender=other), x[2])
    # client 2's own share for v reflected back to it as "from v": key and associated data bind the
    # direction (a mutation test found nothing else would catch it)
    own = next(e for e in run.share_msgs[2].shares if e.recipient == s0.sender)
    with pytest.raises(SecAggMessageError, match="AES-GCM"):
        run.clients[2].mask_input(_with_share(to2, 0, nonce=own.nonce, ciphertext=own.ciphertext), x[2])
    # a share from another round: replay of round 7's share into a round-8 run
    p8 = dataclasses.replace(p, round_id=8)
    run8 = Run(p8, seed=0).through(1)
    fwd8 = run8.forwards[2]
    with pytest.raises(SecAggMessageError, match="round 7, expected round 8"):
        run8.clients[2].mask_input(dataclasses.replace(fwd8, shares=(to2.shares[0],) + fwd8.shares[1:]), x[2])
    with pytest.raises(SecAggMessageError, match="AES-GCM"):  # header rewritten to round 8
        forged = dataclasses.replace(to2.shares[0], round_id=8)
        run8.clients[2].mask_input(dataclasses.replace(fwd8, shares=(forged,) + fwd8.shares[1:]), x[2])
    with pytest.raises(SecAggMessageError, match="round 7, expected round 8"):
        run8.clients[2].mask_input(to2, x[2])
    with pytest.raises(SecAggMessageError, match="delivered to client 2"):
        run.clients[2].mask_input(to3, x[2])
    with pytest.raises(SecAggMessageError, match="lacks the shares"):
        run.clients[2].mask_input(dataclasses.replace(to2, shares=to2.shares[1:]), x[2])
    with pytest.raises(SecAggMessageError, match="duplicate share"):
        run.clients[2].mask_input(dataclasses.replace(to2, shares=to2.shares + to2.shares[:1]), x[2])


def test_server_rejects_replayed_duplicate_and_unknown_messages():
    p = make_params(n=4, t=3, m=16, round_id=3)
    run = Run(p)
    x = inputs(run.ids, p.vector_length)
    adv = {i: run.clients[i].advertise_keys() for i in run.ids}
    run.server.receive_advertise(adv[1])
    with pytest.raises(SecAggMessageError, match="duplicate AdvertiseKeys from client 1"):
        run.server.receive_advertise(adv[1])
    with pytest.raises(SecAggMessageError, match="unknown client id 9"):
        run.server.receive_advertise(dataclasses.replace(adv[2], sender=9))
    with pytest.raises(SecAggMessageError, match="already used"):
        run.server.receive_advertise(dataclasses.replace(adv[2], c_public=adv[1].s_public))
    with pytest.raises(SecAggMessageError, match="round 2, expected round 3"):
        run.server.receive_advertise(dataclasses.replace(adv[2], round_id=2))
    for i in (2, 3, 4):
        run.server.receive_advertise(adv[i])
    run.keys = run.server.broadcast_keys()
    with pytest.raises(SecAggMessageError, match="outside its stage"):
        run.server.receive_advertise(adv[2])
    run.round1()
    run.masked = {}
    y1 = run.clients[1].mask_input(run.forwards[1], x[1])
    with pytest.raises(SecAggMessageError, match="out of order"):  # a replayed ShareForward, at the client
        run.clients[1].mask_input(run.forwards[1], x[1])
    with pytest.raises(SecAggMessageError, match="out of order"):
        run.clients[1].share_keys(run.keys)
    run.server.receive_masked_input(y1)
    with pytest.raises(SecAggMessageError, match="duplicate MaskedInput"):
        run.server.receive_masked_input(y1)
    with pytest.raises(SecAggMessageError, match="round 2"):
        run.server.receive_masked_input(dataclasses.replace(y1, round_id=2))
    with pytest.raises(SecAggMessageError, match="bytes"):
        run.server.receive_masked_input(MaskedInput(3, 2, b"\0" * 8))
    for i in (2, 3, 4):
        run.server.receive_masked_input(run.clients[i].mask_input(run.forwards[i], x[i]))
    req = run.server.unmask_request()
    responses = {i: run.clients[i].unmask(req) for i in run.ids}
    run.server.receive_unmask(responses[1])
    with pytest.raises(SecAggMessageError, match="duplicate UnmaskResponse"):
        run.server.receive_unmask(responses[1])
    with pytest.raises(SecAggMessageError, match="does not match"):
        run.server.receive_unmask(dataclasses.replace(responses[2], b_shares=responses[2].b_shares[1:]))
    for i in (2, 3, 4):
        run.server.receive_unmask(responses[i])
    res = run.server.finalize()  # rejected messages did not disturb the round
    assert np.max(np.abs(res.sum - sum(x.values()))) <= res.tolerance


def test_client_rejects_bad_key_lists():
    p = make_params(n=4, t=3, m=8)
    run = Run(p)
    run.round0()
    c = run.clients[1]
    keys = run.keys
    with pytest.raises(SecAggMessageError, match="twice"):
        c.share_keys(dataclasses.replace(keys, clients=keys.clients + keys.clients[-1:]))
    with pytest.raises(SecAggMessageError, match="own public keys"):
        c.share_keys(dataclasses.replace(keys, clients=keys.clients[1:]))
    low_order = dataclasses.replace(keys.clients[3], c_public=bytes(32))
    with pytest.raises(SecAggMessageError, match="invalid X25519 public key of client 4"):
        c.share_keys(dataclasses.replace(keys, clients=keys.clients[:3] + (low_order,)))
    with pytest.raises(SecAggAbort, match="2 clients advertised keys, threshold is 3"):
        c.share_keys(dataclasses.replace(keys, clients=keys.clients[:2]))
    with pytest.raises(SecAggAbort, match="aborted"):  # an aborted client stays aborted
        c.share_keys(keys)


# --------------------------------------------------------------------------------------------------
# never both shares of one peer
# --------------------------------------------------------------------------------------------------


def test_client_refuses_to_reveal_both_shares_of_a_peer():
    _, run, x = started(2, skip={5}, n=5, t=3, m=16)
    req = run.request
    assert req.dropped == (5,)
    greedy = UnmaskRequest(req.round_id, req.survivors, req.dropped + (2,))  # 2 in both lists
    with pytest.raises(SecAggAbort, match=r"refuses to unmask: asked for both .* client\(s\) \[2\]"):
        run.clients[1].unmask(greedy)
    with pytest.raises(SecAggAbort):  # the refusal is final, even for an honest request
        run.clients[1].unmask(req)
    # a second request (e.g. after "dropping" client 2) is refused: two answers could reveal both shares
    run.clients[3].unmask(req)
    swapped = UnmaskRequest(req.round_id, (1, 3, 4), (2, 5))
    with pytest.raises(SecAggAbort, match="already answered"):
        run.clients[3].unmask(swapped)
    # malformed requests are rejected without giving anything away
    with pytest.raises(SecAggMessageError, match="does not account"):
        run.clients[4].unmask(UnmaskRequest(req.round_id, (1, 3, 4), (5,)))
    with pytest.raises(SecAggMessageError, match="outside"):
        run.clients[4].unmask(UnmaskRequest(req.round_id, req.survivors + (9,), req.dropped))
    # and the server never accepts a response carrying both
    resp = run.clients[4].unmask(req)
    both = dataclasses.replace(resp, s_shares=resp.s_shares + resp.b_shares[:1])
    with pytest.raises(SecAggMessageError, match="both shares"):
        run.server.receive_unmask(both)


# --------------------------------------------------------------------------------------------------
# privacy: what the server sees
# --------------------------------------------------------------------------------------------------


def _masked_update(x: np.ndarray, n=6, t=4, seed=2024, who=3) -> tuple[np.ndarray, np.ndarray]:
    """(y_who, encode(x_who)) for a round where every client holds ``x``."""
    p = make_params(n=n, t=t, m=x.size, clip=float(max(1.0, np.abs(x).max())))
    run = Run(p, seed=seed)
    run.through(1)
    y = run.clients[who].mask_input(run.forwards[who], x)
    return np.frombuffer(y.data, dtype=P.WORD), p.fixed_point.encode(x)


ALPHA = 1e-4  # deterministic (fixed seeds); a uniform stream would fail this 0.01 % of the time


@pytest.mark.parametrize("kind", ["zeros", "ramp"])
def test_single_masked_update_looks_uniform(kind):
    m = 100_000
    x = np.zeros(m) if kind == "zeros" else np.tile(np.linspace(-1, 1, 100), m // 100)
    y, enc = _masked_update(x)
    for arr, expect_uniform in ((y, True), (enc, False)):
        pvals = [
            stats.chisquare(np.bincount((arr >> 24).astype(np.int64), minlength=256)).pvalue,  # high byte
            stats.chisquare(np.bincount((arr & 0xFF).astype(np.int64), minlength=256)).pvalue,  # low byte
            stats.kstest(arr / 2.0**32, "uniform").pvalue,
        ]
        if expect_uniform:
            assert min(pvals) > ALPHA, pvals
        else:  # the test has power: the unmasked encoding is rejected
            assert min(pvals) < ALPHA, pvals


def test_server_view_holds_no_plaintext_update():
    n, m = 5, 2000
    rng = np.random.default_rng(9)
    ups = [rng.uniform(-1, 1, m).astype(np.float32) for _ in range(n)]
    log: list = []
    res = secure_aggregate(ups, threshold=3, seed=77, clip=1.0, dropouts_after_masking=[4], transcript=log)
    view = b"".join(encode(msg) for d, msg in log if d == "to_server")
    fp = FixedPoint.auto(1.0, n)
    assert res.survivors == (1, 2, 3, 4)
    for k, u in enumerate(ups):
        enc = fp.encode(u)
        for blob in (u.tobytes(), u.astype(np.float64).tobytes(), enc.tobytes()):
            for start in range(0, len(blob) - 16, len(blob) // 64):
                assert blob[start : start + 16] not in view, f"client {k + 1}'s update leaks into the server's view"
        masked = [m_ for d, m_ in log if d == "to_server" and isinstance(m_, MaskedInput) and m_.sender == k + 1]
        for mi in masked:
            y = np.frombuffer(mi.data, dtype=P.WORD)[:m]
            assert np.mean(y == enc) < 0.01  # chance agreement only


def test_self_mask_hides_a_late_input_after_its_pairwise_masks_are_revealed():
    """Client 5's masked input arrives after the server declared it dropped, so the server ends up with
    both y_5 and (via the survivors' shares) s_5's key, hence all of y_5's pairwise masks. What is left,
    x_5 + PRG(b_5), must still look uniform: that is what the self mask is for."""
    m = 20_000
    p = make_params(n=5, t=3, m=m, clip=1.0)
    run = Run(p, seed=5)
    x = {i: np.zeros(m) for i in run.ids}
    run.through(2, x, skip={5})
    late = run.clients[5].mask_input(run.forwards[5], x[5])
    with pytest.raises(SecAggMessageError, match="outside its stage"):
        run.server.receive_masked_input(late)
    responses = [run.clients[u].unmask(run.request) for u in run.request.survivors]
    s5 = P.private_from_bytes(shamir.combine({r.sender: r.s_shares[0].share for r in responses}, p.threshold))
    assert P.public_bytes(s5) == run.keys.clients[4].s_public
    y = np.frombuffer(late.data, dtype=P.WORD).copy()
    plus, minus = [], []
    for u in run.request.survivors:
        seed = P.pairwise_seed(P.agree(s5, run.keys.clients[u - 1].s_public, u), p.round_id, u, 5)
        (plus if u < 5 else minus).append(seed)  # y_5 carried −PRG(s_u5) for u < 5
    P.add_masks(y, plus, minus)
    assert stats.kstest(y / 2.0**32, "uniform").pvalue > ALPHA
    b5 = run.clients[5]._b  # with b_5 as well (which honest clients never reveal for a dropped peer) ...
    P.add_masks(y, (), [P.self_mask_seed(b5, p.round_id)])
    assert not y.any()  # ... the input would be exposed


def test_tampered_self_mask_share_is_detected_with_exactly_t_responders():
    """With exactly t responses Shamir has no redundancy to expose a wrong share; the commitment to b_u
    sent in ShareKeys does (otherwise the sum would come out silently wrong)."""
    p = make_params(n=3, t=2, m=16)
    for tamper in (False, True):
        run = Run(p)
        x = inputs(run.ids, p.vector_length)
        run.through(2, x)
        responses = {u: run.clients[u].unmask(run.request) for u in (1, 2)}  # client 3 never answers
        if tamper:  # shift responder 2's share so that b_1 comes out +1 in its first chunk: in range
            shares = list(responses[2].b_shares)
            k = next(i for i, s in enumerate(shares) if s.owner == 1)
            raw, size = shares[k].share, shamir.ELEMENT_BYTES
            weight = shamir._lagrange_weights((1, 2), 0)[1]
            y = (int.from_bytes(raw[:size], "little") + pow(weight, -1, shamir.PRIME)) % shamir.PRIME
            shares[k] = dataclasses.replace(shares[k], share=y.to_bytes(size, "little") + raw[size:])
            responses[2] = dataclasses.replace(responses[2], b_shares=tuple(shares))
        for r in responses.values():
            run.server.receive_unmask(r)
        if tamper:
            with pytest.raises(SecAggAbort, match="self-mask secret of client 1 does not match its commitment"):
                run.server.finalize()
        else:
            np.testing.assert_allclose(run.server.finalize().sum, sum(x.values()), atol=1e-4)


def test_server_refuses_a_low_order_public_key_at_advertise():
    """An all-zero X25519 key would make every honest peer fail its key agreement later (and the round
    abort): the server turns it away at once, and the round goes on without that client."""
    p = make_params(n=4, t=3, m=8)
    run = Run(p)
    msg = run.clients[4].advertise_keys()
    with pytest.raises(SecAggMessageError, match="invalid X25519 public key of client 4"):
        run.server.receive_advertise(dataclasses.replace(msg, c_public=bytes(32)))
    run.round0(skip=(4,))
    run.round1()
    x = inputs([1, 2, 3], p.vector_length)
    run.round2(x)
    np.testing.assert_allclose(run.round3().sum, sum(x.values()), atol=1e-4)


def test_summed_weights_must_not_wrap():
    """Each client's weight is only bounded by W, so n·W must stay below 2^32: otherwise n weights of
    1.6e9 (each ≤ W = 2^31) would sum, mod 2^32, to a total below W and pass the server's check."""
    fp = FixedPoint(1.0, 0.5)
    with pytest.raises(SecAggError, match="must stay below 2\\^32"):
        SecAggParams(1, 3, 2, 4, fp, weighted=True, max_total_weight=2**31)
    SecAggParams(1, 3, 2, 4, fp, weighted=True, max_total_weight=2**32 // 3)


def test_non_canonical_public_keys_are_refused():
    """X25519 ignores bit 255: the same key with it set is another byte string, which would pass the
    server's byte-wise "key already used" and c ≠ s checks."""
    sk = P.private_from_bytes(os.urandom(32))
    pub = P.public_bytes(sk)
    P.check_public_key(pub, 3)
    alias = pub[:31] + bytes([pub[31] | 0x80])
    with pytest.raises(SecAggMessageError, match="canonical"):
        P.check_public_key(alias, 3)
    with pytest.raises(SecAggMessageError, match="canonical"):
        P.agree(sk, ((1 << 255) - 19 + 1).to_bytes(32, "little"), 4)  # 1 + p ≡ 1, encoded unreduced


# --------------------------------------------------------------------------------------------------
# a misbehaving server or client
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,t", [(4, 2), (6, 3), (10, 5)])
def test_a_threshold_of_half_the_cohort_is_refused(n, t):
    """With 2t ≤ n a server could tell one half that client 1 survived (they reveal b_1) and the other
    half that it dropped (they reveal s_1): both secrets, so client 1's update in clear."""
    with pytest.raises(SecAggError, match=f"threshold {t} of {n} clients must exceed n/2"):
        make_params(n=n, t=t)
    make_params(n=n, t=n // 2 + 1)


def _responses(run, *, liars=(), x=None, skip=()):
    """Rounds 0–2 on ``x`` (clients ``skip`` drop before masking) and the survivors' unmask responses,
    those of ``liars`` with one bit of their share of client 1's self-mask secret flipped."""
    run.through(2, x, skip=skip)
    resp = {u: run.clients[u].unmask(run.request) for u in run.request.survivors}
    for liar in liars:
        raw = next(s.share for s in resp[liar].b_shares if s.owner == 1)
        resp[liar] = _with_b_share(resp[liar], 1, bytes([raw[0] ^ 1]) + raw[1:])
    return resp


def _with_b_share(resp, owner, share):
    shares = tuple(dataclasses.replace(s, share=share) if s.owner == owner else s for s in resp.b_shares)
    return dataclasses.replace(resp, b_shares=shares)


def test_a_share_outside_the_field_is_refused_on_arrival_and_the_rest_recover_the_sum():
    p = make_params(n=4, t=3, m=32)
    run = Run(p)
    x = inputs(run.ids, p.vector_length)
    resp = _responses(run, x=x)
    bad = _with_b_share(resp[1], 2, b"\xff" * shamir.SHARE_BYTES)
    with pytest.raises(SecAggMessageError, match="client 1: Shamir share holds a value outside the field"):
        run.server.receive_unmask(bad)
    for u in (2, 3, 4):
        run.server.receive_unmask(resp[u])
    res = run.server.finalize()  # client 1 counts as not having answered
    np.testing.assert_allclose(res.sum, sum(x.values()), atol=res.tolerance)


def test_one_responders_wrong_share_is_left_out_and_named():
    """A share on no polynomial with the others must not let one client abort every round: with more
    than t answers the server leaves each responder out in turn and keeps the recovery that checks out."""
    p = make_params(n=5, t=3, m=32)
    run = Run(p)
    x = inputs(run.ids, p.vector_length)
    resp = _responses(run, liars=(3,), x=x, skip=(5,))  # client 5 dropped: its key is recovered too
    for r in resp.values():
        run.server.receive_unmask(r)
    res = run.server.finalize()
    assert res.inconsistent == (3,)
    np.testing.assert_allclose(res.sum, sum(x[u] for u in (1, 2, 3, 4)), atol=res.tolerance)


def test_two_responders_wrong_shares_abort_the_round():
    p = make_params(n=5, t=3, m=8)
    run = Run(p)
    resp = _responses(run, liars=(2, 3), x=inputs(run.ids, p.vector_length))
    for r in resp.values():
        run.server.receive_unmask(r)
    with pytest.raises(SecAggAbort, match="self-mask secret of client 1 does not match its commitment"):
        run.server.finalize()


def test_masks_that_do_not_cancel_abort_instead_of_returning_garbage():
    """Client 2 sees a corrupted key of client 1 (the server's broadcast, or the wire): their pairwise
    masks differ, and the unmasked words spread over Z_2^32, far beyond n·clip."""
    p = make_params(n=4, t=3, m=64)
    run = Run(p)
    x = inputs(run.ids, p.vector_length)
    run.round0()
    keys = run.keys
    k1 = keys.clients[0]
    flipped = dataclasses.replace(k1, s_public=bytes([k1.s_public[0] ^ 2]) + k1.s_public[1:])
    forged = dataclasses.replace(keys, clients=(flipped,) + keys.clients[1:])
    run.share_msgs = {}
    for k in keys.clients:
        run.share_msgs[k.sender] = run.clients[k.sender].share_keys(forged if k.sender == 2 else keys)
        run.server.receive_shares(run.share_msgs[k.sender])
    run.forwards = run.server.forward_shares()
    run.round2(x)
    with pytest.raises(SecAggAbort, match="outside what the clients' clipped inputs can add up to"):
        run.round3()


def test_inputs_at_the_clip_under_any_scale_pass_the_cancellation_check():
    """Every client at +clip under a scale whose products land on rounding half-points: the exact sum is
    the bound itself, which the float64 bound fell a unit short of (an honest round aborted)."""
    clip, scale = 5.2315422250850805, 193260.3153142967
    result = secure_aggregate([np.full(3, clip)] * 5, threshold=3, clip=clip, scale=scale, seed=1)
    np.testing.assert_allclose(result.sum, 5 * clip, atol=result.tolerance)


def test_auto_scale_halves_when_log2_rounds_up():
    room = (2**31 - 1) - 1.0
    for m in range(-4, 5):
        clip = room / 2**10 * (1 + m * 2.0**-52)
        fp = FixedPoint.auto(clip, 2, 1)
        fp.check_capacity(2, 1)


def test_wrong_shares_in_different_secrets_are_each_left_out_of_their_own():
    """Responder 2 holds a wrong share of client 1's secret, responder 3 one of client 4's: each recovery
    leaves out its own wrong share only (a wrong share may be its dealer's doing, so no holder is
    excluded from the secrets where its shares are right)."""
    p = make_params(n=5, t=3, m=16)
    run = Run(p)
    x = inputs(run.ids, p.vector_length)
    resp = _responses(run, x=x)
    for liar, owner in ((2, 1), (3, 4)):
        raw = next(s.share for s in resp[liar].b_shares if s.owner == owner)
        resp[liar] = _with_b_share(resp[liar], owner, bytes([raw[0] ^ 1]) + raw[1:])
    for r in resp.values():
        run.server.receive_unmask(r)
    res = run.server.finalize()
    assert res.inconsistent == (2, 3)
    np.testing.assert_allclose(res.sum, sum(x.values()), atol=res.tolerance)


# -------------------------------------------- checks an honest server's run never exercises (mutation tests)


def test_a_client_refuses_to_unmask_for_fewer_than_t_survivors():
    """A lying server's unmask request naming t−1 survivors is refused by the client itself."""
    p, run, x = started(2, n=5, t=4, m=8)
    with pytest.raises(SecAggAbort, match="threshold is 4"):
        run.clients[1].unmask(UnmaskRequest(p.round_id, (1, 2, 3), (4, 5)))


def test_a_client_refuses_to_mask_for_fewer_than_t_participants():
    _, run, x = started(1, n=5, t=4, m=8)
    fwd = run.forwards[1]
    few = ShareForward(fwd.round_id, 1, (1, 2, 3), tuple(e for e in fwd.shares if e.sender in (2, 3)))
    with pytest.raises(SecAggAbort, match="threshold is 4"):
        run.clients[1].mask_input(few, x[1])


def test_a_total_weight_above_the_public_bound_aborts():
    """Each weight within W but their sum above it: the fixed-point capacity was sized for W."""
    p = make_params(n=3, t=2, m=8, weighted=True, max_total_weight=10)
    run = Run(p)
    x = inputs(run.ids, p.vector_length, lo=-0.1, hi=0.1)
    run.through(2, x, weights={1: 8, 2: 8, 3: 0})
    with pytest.raises(SecAggAbort, match="exceeds max_total_weight"):
        run.round3()


def test_a_shares_key_and_associated_data_each_bind_round_and_direction():
    ss, nonce, plain = bytes(range(32)), bytes(12), bytes(96)
    ct = P.encrypt_share(P.share_key(ss, 5, 1, 2), nonce, plain, P.share_ad(5, 1, 2))
    for r, a, b in [(6, 1, 2), (5, 2, 1), (5, 1, 3)]:
        with pytest.raises(SecAggMessageError):  # the right key, another message's data
            P.decrypt_share(P.share_key(ss, 5, 1, 2), nonce, ct, P.share_ad(r, a, b), 1)
        with pytest.raises(SecAggMessageError):  # the right data, another message's key
            P.decrypt_share(P.share_key(ss, r, a, b), nonce, ct, P.share_ad(5, 1, 2), 1)


@pytest.mark.parametrize("t", [2, 3, 4])
def test_t_minus_one_shares_do_not_give_the_secret_and_the_polynomial_has_degree_t_minus_one(t):
    """Shares from a polynomial of too low a degree still combine to the right secret at t, so no sum
    test sees it; but then t−1 colluders recover every secret."""
    secret = os.urandom(32)
    shares = shamir.split(secret, t, list(range(1, t + 3)), RandomSource(3, "t"))
    try:
        got = shamir.combine({x: shares[x] for x in range(1, t)}, t - 1)
    except SecAggError:
        got = None
    assert got != secret
    with pytest.raises(SecAggError, match="inconsistent"):
        shamir.combine(shares, t - 1)
    assert shamir.combine(shares, t) == secret
