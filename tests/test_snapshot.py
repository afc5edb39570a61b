"""Snapshot: immutability, lookups, standard errors and the checksummed byte format."""

from __future__ import annotations

import hashlib
import json
import math
import struct

import numpy as np
import pytest

from streamlmm import MixedLM, Snapshot, SnapshotError
from streamlmm.keys import UnknownGroupError
from streamlmm.snapshot import MAGIC

# lme4 1.1.31, summary(lmer(Reaction ~ Days + (Days | Subject), sleepstudy))
LME4_SLEEPSTUDY_SE = {"(Intercept)": 6.824597, "x1": 1.545790}


@pytest.fixture(scope="module")
def sleep(reference):
    """A REML fit of sleepstudy with random slopes, and its snapshot."""
    case = reference("sleepstudy_slopes_reml")
    model = MixedLM(case.ref["formula"], case.method)
    case.stream_many(model)
    snap = model.fit().snapshot(offsets={"events:0": 180}, source="test")
    return case, model, snap


def _mixed_key_snapshot() -> Snapshot:
    model = MixedLM("y ~ x + (1 + x | g)")
    for i in range(60):
        key = i % 5 if i % 2 else f"s{i % 3}"
        model.learn_one({"g": key, "x": float(i % 7)}, 0.5 * (i % 7) + (i % 5) + 0.1 * (i % 4))
    return model.fit().snapshot()


def _same(a: Snapshot, b: Snapshot) -> None:
    # via JSON text, so that NaN (an empty model's estimates) compares equal to itself
    assert json.dumps(a.to_dict(groups=True)) == json.dumps(b.to_dict(groups=True))
    assert a.keys == b.keys
    assert [type(k) for k in a.keys] == [type(k) for k in b.keys]
    np.testing.assert_array_equal(a.b, b.b)
    np.testing.assert_array_equal(a.condvar, b.condvar)
    np.testing.assert_array_equal(a.re_cov, b.re_cov)
    assert (a.state is None) == (b.state is None)
    if a.state is not None:
        assert set(a.state) == set(b.state)
        for k, v in a.state.items():
            if isinstance(v, np.ndarray):
                np.testing.assert_array_equal(v, b.state[k])
            else:
                assert v == b.state[k], k


# -- immutability -----------------------------------------------------------------------------
def test_attributes_cannot_be_set_or_deleted(sleep):
    _, _, s = sleep
    with pytest.raises(AttributeError):
        s.sigma = 1.0
    with pytest.raises(AttributeError):
        s.new_attribute = 1
    with pytest.raises(AttributeError):
        del s.sigma
    assert s.sigma > 0


def test_arrays_and_mappings_are_read_only(sleep):
    _, _, s = sleep
    for a in (s.b, s.condvar, s.re_cov, s.theta):
        assert not a.flags.writeable
        with pytest.raises(ValueError):
            a[(0,) * a.ndim] = 1.0
    for k, v in s.state.items():
        if isinstance(v, np.ndarray):
            assert not v.flags.writeable, k
    with pytest.raises(TypeError):
        s.fixef["x1"] = 0.0  # type: ignore[index]
    with pytest.raises(TypeError):
        s.state["M"] = None  # type: ignore[index]
    with pytest.raises(TypeError):
        s.offsets["events:0"] = 0  # type: ignore[index]


def test_snapshot_does_not_alias_the_model(reference):
    case = reference("sleepstudy_slopes_reml")
    model = MixedLM(case.ref["formula"], case.method)
    case.stream_many(model)
    s = model.fit().snapshot()
    b, S = s.b.copy(), s.state["M"].copy()
    model.learn_one({"g": "308", "x1": 3.0}, 500.0)
    model.fit()
    np.testing.assert_array_equal(s.b, b)
    np.testing.assert_array_equal(s.state["M"], S)


# -- lookups ------------------------------------------------------------------------------------
def test_unseen_group_lookups(sleep):
    _, _, s = sleep
    for lookup in (s.ranef, s.ranef_cov, s.n, s.shrinkage):
        with pytest.raises(KeyError, match="unknown group 'nobody': not among the 18 groups"):
            lookup("nobody")
        with pytest.raises(UnknownGroupError, match='fallback="population"'):
            lookup(None)
    pop = "population"
    assert s.ranef("nobody", fallback=pop) == {"(Intercept)": 0.0, "x1": 0.0}
    np.testing.assert_array_equal(s.ranef_cov("nobody", fallback=pop), s.re_cov)
    assert s.n("nobody", fallback=pop) == 0.0
    assert s.shrinkage("nobody", fallback=pop) == {"(Intercept)": 0.0, "x1": 0.0}
    with pytest.raises(ValueError, match="fallback must be None or 'population'"):
        s.ranef("nobody", fallback="zero")
    assert "nobody" not in s and "308" in s
    # prediction for an unseen group is the fixed part (documented: the population's)
    assert s.predict({"g": "nobody", "x1": 2.0}) == pytest.approx(
        s.fixef["(Intercept)"] + 2.0 * s.fixef["x1"], rel=1e-15
    )
    assert s.predict({"x1": 2.0}) == s.predict({"g": "nobody", "x1": 2.0})


def test_an_int_str_mix_up_names_the_key_that_exists(sleep):
    _, _, s = sleep  # sleepstudy: subjects "308", "309", ... as strings
    with pytest.raises(KeyError) as info:
        s.ranef(308)
    assert str(info.value) == (
        "unknown group 308 (an int); the snapshot has the string '308': an int and a str "
        'are different groups (or pass fallback="population" for the population\'s values)'
    )
    m = MixedLM("y ~ x + (1 | g)")
    for i in range(40):
        m.learn_one({"g": [17, "H017", 3][i % 3], "x": float(i % 4)}, float(i % 5))
    t = m.fit().snapshot()
    with pytest.raises(
        KeyError, match=r"unknown group '17' \(a str\); the snapshot has the int 17"
    ):
        t.n("17")
    with pytest.raises(KeyError, match="unknown group 'H17': not among the 3 groups"):
        t.n("H17")
    # integer-valued keys of other types name the int group, as when learning
    assert t.n(np.int64(17)) == t.n(17.0) == t.n(17) == 14.0


def test_seen_group_lookups_use_its_blup(sleep):
    _, _, s = sleep
    b = s.ranef("308")
    assert s.predict({"g": "308", "x1": 2.0}) == pytest.approx(
        s.fixef["(Intercept)"] + b["(Intercept)"] + 2.0 * (s.fixef["x1"] + b["x1"]), rel=1e-14
    )
    assert s.ranef_cov("308").shape == (2, 2)


def test_snapshot_predict_matches_model_predict_one(sleep):
    case, model, s = sleep
    for key in ["308", "309", "372", "unseen"]:
        for x1 in (0.0, 4.5, 9.0):
            x = {"g": key, "x1": x1}
            assert s.predict(x) == pytest.approx(model.predict_one(x), rel=1e-11)


def test_predict_with_missing_feature_names_it(sleep):
    _, _, s = sleep
    with pytest.raises(ValueError, match="'x1'"):
        s.predict({"g": "308"})
    with pytest.raises(ValueError, match="'x1'"):
        s.predict({"g": "308", "x1": "3"})


def test_counts_and_metadata(sleep):
    _, model, s = sleep
    assert (s.n_obs, s.n_groups, s.n_events) == (180.0, 18, model.n_events)
    assert dict(s.offsets) == {"events:0": 180}
    assert s.meta["source"] == "test" and "created" in s.meta
    json.dumps(s.to_dict(groups=True))  # JSON-ready


def test_empty_model_snapshot_is_valid_and_says_not_converged():
    s = MixedLM("y ~ x + (1 | g)").snapshot()
    assert not s.converged and s.n_groups == 0 and math.isnan(s.sigma)
    _same(s, Snapshot.from_bytes(s.to_bytes()))


# -- standard errors ---------------------------------------------------------------------------
def test_fixef_se_equals_dense_computation(sleep):
    """fixef_se = sqrt(diag(σ²(X'V⁻¹X)⁻¹)) with V = I + ZΛΛ'Z' written out densely."""
    case, _, s = sleep
    d = case.dense().at(s.theta, reml=True)
    assert s.sigma**2 == pytest.approx(d.sigma2, rel=1e-10)
    np.testing.assert_allclose(list(s.fixef_se.values()), np.sqrt(np.diag(d.vcov_beta)), rtol=1e-9)


def test_fixef_se_matches_lme4_summary(sleep):
    case, _, s = sleep
    at_lme4 = case.dense().at(case.theta, reml=True)
    se_at_lme4 = dict(zip(case.fixef, np.sqrt(np.diag(at_lme4.vcov_beta))))
    for name, want in LME4_SLEEPSTUDY_SE.items():
        assert se_at_lme4[name] == pytest.approx(want, rel=1e-6)  # 7 printed digits
        assert s.fixef_se[name] == pytest.approx(want, rel=1e-5)  # at our (better) θ


# -- bytes -------------------------------------------------------------------------------------
def test_bytes_roundtrip(sleep):
    _, _, s = sleep
    _same(s, Snapshot.from_bytes(s.to_bytes()))


def test_bytes_roundtrip_keeps_int_and_str_keys_apart():
    s = _mixed_key_snapshot()
    assert {type(k) for k in s.keys} == {int, str}
    back = Snapshot.from_bytes(s.to_bytes())
    _same(s, back)
    assert back.ranef(1) == s.ranef(1) and back.ranef("s1") == s.ranef("s1")


@pytest.mark.parametrize("where", [0, 9, 20, 0.3, 0.5, 0.8, -40, -1])
def test_a_flipped_byte_is_detected(sleep, where):
    _, _, s = sleep
    data = bytearray(s.to_bytes())
    i = int(where * len(data)) if isinstance(where, float) else where % len(data)
    data[i] ^= 0x01
    with pytest.raises(SnapshotError):
        Snapshot.from_bytes(bytes(data))


@pytest.mark.parametrize("keep", [0, 10, 52, 0.5, -1])
def test_truncated_bytes_are_detected(sleep, keep):
    _, _, s = sleep
    data = s.to_bytes()
    n = int(keep * len(data)) if isinstance(keep, float) else keep % len(data)
    with pytest.raises(SnapshotError):
        Snapshot.from_bytes(data[:n])


def _resign(body: bytes) -> bytes:
    return body + hashlib.sha256(body).digest()


def test_wrong_magic_version_or_header_with_valid_checksum(sleep):
    _, _, s = sleep
    body = s.to_bytes()[:-32]
    prefix = struct.Struct("<8sIQ")
    magic, version, hlen = prefix.unpack_from(body)
    assert magic == MAGIC
    rest = body[prefix.size :]
    with pytest.raises(SnapshotError, match="not a streamlmm snapshot"):
        Snapshot.from_bytes(_resign(prefix.pack(b"NOTASNAP", version, hlen) + rest))
    with pytest.raises(SnapshotError, match="version"):
        Snapshot.from_bytes(_resign(prefix.pack(magic, version + 1, hlen) + rest))
    with pytest.raises(SnapshotError, match="header"):
        Snapshot.from_bytes(_resign(prefix.pack(magic, version, 1 << 40) + rest))
    header = json.loads(rest[:hlen])
    del header["fixef"]
    bad = json.dumps(header).encode()
    with pytest.raises(SnapshotError, match="malformed"):
        Snapshot.from_bytes(_resign(prefix.pack(magic, version, len(bad)) + bad + rest[hlen:]))


def test_save_then_load(sleep, tmp_path):
    _, _, s = sleep
    path = s.save(tmp_path)
    assert str(tmp_path) in path
    _same(s, Snapshot.load(tmp_path))


def test_load_from_an_empty_directory_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        Snapshot.load(tmp_path)
