"""EPDParams: construction, validation, compatibility, save/load and every broken-file case;
files written by earlier code (tests/data) for all three params families; what every
corrupt params file gives (one line naming the file)."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from epd_kernels.params import EPDParams
from epd_kernels.params.file import checksum as _checksum

F64 = torch.float64


def grid(S, smax=80.0, smin=0.002, rho=7.0):
    i = torch.arange(S + 1, dtype=F64) / S
    return (smax ** (1 / rho) + i * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho


def trained_like(S=3, K=2, seed=0, dtype=F64, **kw):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(S, K, generator=g, dtype=F64) + 0.05
    return EPDParams(r=torch.rand(S, K, generator=g, dtype=F64).to(dtype),
                     weights=(w / w.sum(1, keepdim=True)).to(dtype),
                     delta=(0.1 * torch.randn(S, K, generator=g, dtype=F64)).to(dtype),
                     o=(0.05 * torch.randn(S, generator=g, dtype=F64)).to(dtype),
                     sigmas=grid(S), **kw).validate()


def assert_same(a: EPDParams, b: EPDParams):
    for n in ("r", "weights", "delta", "o", "sigmas"):
        ta, tb = getattr(a, n), getattr(b, n)
        assert ta.dtype == tb.dtype and torch.equal(ta, tb), n
    for n in ("nfe", "afs", "plugin", "max_order", "schedule", "meta"):
        assert getattr(a, n) == getattr(b, n), n


# --------------------------------------------------------------------------------------
# construction


def test_init_defaults():
    p = EPDParams.init(grid(3), 2)
    assert p.num_steps == 3 and p.num_points == 2 and p.nfe == 5 and p.afs and not p.plugin
    assert p.solver == "epd" and p.total_evaluations == 8
    # Gauss-Legendre in sigma: tau_k = t + c_k (t' - t), c = 1/2 -+ 1/(2 sqrt 3), w = 1/2
    c = torch.tensor([0.5 - 0.5 / math.sqrt(3), 0.5 + 0.5 / math.sqrt(3)], dtype=F64)
    t, t1 = p.sigmas[:-1, None], p.sigmas[1:, None]
    tau = t * (t1 / t) ** p.r
    torch.testing.assert_close(tau, t + c * (t1 - t), rtol=1e-12, atol=0)
    assert torch.all(p.weights == 0.5) and torch.all(p.delta == 0) and torch.all(p.o == 0)
    assert p.sigmas.dtype == F64
    one = EPDParams.init(grid(2), 1)   # the midpoint rule in sigma
    torch.testing.assert_close(one.sigmas[:-1] * (one.sigmas[1:] / one.sigmas[:-1]) ** one.r[:, 0],
                               (one.sigmas[:-1] + one.sigmas[1:]) / 2, rtol=1e-12, atol=0)
    three = EPDParams.init(grid(2), 3)   # Gauss weights 5/18, 8/18, 5/18 (exact for cubics)
    torch.testing.assert_close(three.weights[0], torch.tensor([5, 8, 5], dtype=F64) / 18)
    log = EPDParams.init(grid(3), 2, r_init="gauss-log")
    torch.testing.assert_close(log.r, c.expand(3, 2))
    assert torch.all(log.weights == 0.5)
    assert torch.all(EPDParams.init(grid(2), 1, r_init="gauss-log").r == 0.5)
    with pytest.raises(ValueError, match="r_init must be one of"):
        EPDParams.init(grid(2), 2, r_init="gauss-sigma")
    lin = EPDParams.init(grid(2), 3, r_init="linspace", afs=False, plugin=True)
    torch.testing.assert_close(lin.r[1], torch.tensor([0.25, 0.5, 0.75], dtype=F64))
    assert lin.nfe == 4 and lin.solver == "epd-ipndm"
    for K in range(1, 6):
        for how in ("gauss", "gauss-log", "linspace"):
            q = EPDParams.init(grid(2), K, r_init=how)
            assert torch.all((q.r > 0) & (q.r < 1)) and torch.all(q.r[:, 1:] > q.r[:, :-1]), how
            torch.testing.assert_close(q.weights.sum(1), torch.ones(2, dtype=F64))


def test_init_bad_arguments():
    with pytest.raises(ValueError, match="num_points"):
        EPDParams.init(grid(2), 0)
    with pytest.raises(ValueError, match="sigmas"):
        EPDParams.init(torch.tensor([1.0]), 1)
    with pytest.raises(ValueError, match="r_init"):
        EPDParams.init(grid(2), 1, r_init="nope")
    with pytest.raises(ValueError, match="sigmas"):
        EPDParams.init(torch.tensor([1.0, 2.0]), 1)   # increasing


def test_to_detach_step_and_lists():
    p = trained_like()
    q = p.to(dtype=torch.float32)
    assert q.r.dtype == torch.float32 and q.sigmas.dtype == F64 and p.r.dtype == F64
    rg = p.r.clone().requires_grad_()
    p2 = EPDParams(r=rg * 1, weights=p.weights, delta=p.delta, o=p.o, sigmas=p.sigmas)
    d = p2.detach()
    assert not d.r.requires_grad and torch.equal(d.r, p.r)
    p2.validate()                       # works on tensors that require grad
    r, w, delta, o = p.step(1)
    assert torch.equal(r, p.r[1]) and o.dim() == 0
    lp = EPDParams(r=[[0.5]], weights=[[1.0]], delta=[[0.0]], o=[0.0], sigmas=[2.0, 1.0])
    assert lp.validate().nfe == 1 and lp.r.dtype == F64


# --------------------------------------------------------------------------------------
# validation


def _broken(field, value, **kw):
    p = trained_like(**kw)
    setattr(p, field, value)
    return p


@pytest.mark.parametrize("field,value,match", [
    ("r", torch.full((3, 2), 1.5, dtype=F64), "r must lie in"),
    ("r", torch.full((3, 2), -0.1, dtype=F64), "r must lie in"),
    ("r", torch.full((3, 3), 0.5, dtype=F64), "weights must have shape"),
    ("r", torch.full((2, 2), 0.5, dtype=F64), "r must have shape"),
    ("r", torch.full((3, 2), float("nan"), dtype=F64), "r has non-finite"),
    ("weights", torch.full((3, 2), 0.6, dtype=F64), "weights must sum to 1"),
    ("weights", torch.tensor([[1.5, -0.5]] * 3, dtype=F64), "weights must be >= 0"),
    ("weights", torch.ones(3, dtype=F64), "weights must have shape"),
    ("delta", torch.full((3, 2), -1.0, dtype=F64), "delta must be > -1"),
    ("delta", torch.full((3, 2), float("inf"), dtype=F64), "delta has non-finite"),
    ("o", torch.full((3,), -2.0, dtype=F64), "o must be > -1"),
    ("o", torch.zeros(3, 1, dtype=F64), "o must have shape"),
    ("sigmas", torch.tensor([80.0, 1.0, 2.0, 0.1], dtype=F64), "strictly decreasing"),
    ("sigmas", torch.tensor([80.0, 1.0, 0.5, 0.0], dtype=F64), "sigmas must be > 0"),
    ("nfe", 7, "nfe = 7"),
    ("max_order", 5, "max_order"),
    ("schedule", 3, "schedule"),
    ("meta", [1], "meta must be a dict"),
    ("r", torch.zeros(3, 2, dtype=torch.int64), "floating"),
])
def test_validate_names_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        _broken(field, value).validate()


def test_validate_tolerates_float32_rounding():
    p = trained_like(dtype=torch.float32)
    p.weights = torch.softmax(torch.randn(3, 2), 1)
    p.validate()


def test_check_compatible():
    p = trained_like()
    p.check_compatible(nfe=5, num_points=2, sigmas=grid(3))
    p.check_compatible(sigmas=grid(3).float())                     # float32 rounding is fine
    with pytest.raises(ValueError, match="NFE 7"):
        p.check_compatible(nfe=7)
    with pytest.raises(ValueError, match="K = 3"):
        p.check_compatible(num_points=3)
    with pytest.raises(ValueError, match="4 steps"):
        p.check_compatible(sigmas=grid(4))
    with pytest.raises(ValueError, match="different time grid"):
        p.check_compatible(sigmas=grid(3, rho=5.0))
    p.check_compatible(solver="epd", plugin=False, afs=True)
    with pytest.raises(ValueError, match=r"'epd' \(plugin=False\), not 'epd-ipndm'"):
        p.check_compatible(plugin=True)
    with pytest.raises(ValueError, match=r"'epd' \(plugin=False\), not 'amed'"):
        p.check_compatible(solver="amed")
    with pytest.raises(ValueError, match="afs=False was asked but the EPD params were "
                                         "distilled with afs=True"):
        p.check_compatible(afs=False)


def test_replace_recomputes_nfe_and_copies_meta():
    p = trained_like(meta={"a": 1})
    q = p.replace(afs=False)
    assert (p.nfe, q.nfe) == (5, 6) and q.meta == p.meta and q.meta is not p.meta
    assert q.replace(nfe=7).nfe == 7 and torch.equal(q.r, p.r)


# --------------------------------------------------------------------------------------
# save / load


def test_roundtrip(tmp_path):
    p = trained_like(schedule={"name": "polynomial", "rho": 7}, plugin=True, max_order=3,
                     meta={"teacher": "dpm2", "M": 3, "lr": 0.01})
    path = tmp_path / "sub" / "p.safetensors"
    p.save(path)
    q = EPDParams.load(path)
    assert_same(p, q)
    assert q.solver == "epd-ipndm"
    assert not [f for f in os.listdir(path.parent) if f.startswith(".tmp")]
    q32 = trained_like(dtype=torch.float32)
    q32.save(str(path), overwrite=True)                            # str path
    assert_same(q32, EPDParams.load(str(path)))


def test_header_metadata_is_readable(tmp_path):
    from safetensors import safe_open
    path = tmp_path / "p.safetensors"
    trained_like(schedule="polynomial").save(path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["format_version"]) == EPDParams.FORMAT_VERSION == 1
    assert json.loads(meta["solver"]) == "epd" and json.loads(meta["K"]) == 2
    assert json.loads(meta["nfe"]) == 5 and json.loads(meta["schedule"]) == "polynomial"
    assert json.loads(meta["afs"]) is True and "package_version" in meta


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(S=st.integers(1, 8), K=st.integers(1, 6), afs=st.booleans(), plugin=st.booleans(),
       order=st.integers(1, 4), seed=st.integers(0, 2 ** 16),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_roundtrip_hypothesis(tmp_path, S, K, afs, plugin, order, seed, dtype):
    p = trained_like(S=S, K=K, seed=seed, dtype=dtype, afs=afs, plugin=plugin, max_order=order,
                     meta={"seed": seed})
    path = tmp_path / f"h-{S}-{K}.safetensors"
    p.save(path, overwrite=True)                # hypothesis reuses tmp_path
    assert_same(p, EPDParams.load(path))


def test_missing_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        EPDParams.load(path)


def _saved(tmp_path, **kw):
    path = tmp_path / "p.safetensors"
    trained_like(**kw).save(path)
    return path, path.read_bytes()


@pytest.mark.parametrize("cut", [0, 4, 8, 20, "header-1", "data-1", "data-half"])
def test_truncated_file(tmp_path, cut):
    path, data = _saved(tmp_path)
    n = int.from_bytes(data[:8], "little")
    cut = {"header-1": 8 + n - 1, "data-1": len(data) - 1,
           "data-half": 8 + n + (len(data) - 8 - n) // 2}.get(cut, cut)
    path.write_bytes(data[:cut])
    with pytest.raises(ValueError, match="p.safetensors"):
        EPDParams.load(path)


def test_corrupted_header_and_garbage(tmp_path):
    path, data = _saved(tmp_path)
    bad = bytearray(data)
    bad[9] = ord("#")                                               # inside the JSON header
    path.write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="corrupted"):
        EPDParams.load(path)
    path.write_bytes(os.urandom(200))
    with pytest.raises(ValueError):
        EPDParams.load(path)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="truncated"):
        EPDParams.load(path)


def test_corrupted_tensor_bytes(tmp_path):
    path, data = _saved(tmp_path)
    bad = bytearray(data)
    bad[-3] ^= 0x10                                                 # a bit in the data section
    path.write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="checksum"):
        EPDParams.load(path)


def _write_raw(path, tensors, fields):
    save_file(tensors, str(path), metadata={k: json.dumps(v) for k, v in fields.items()})


def _good_raw(S=3, K=2):
    p = trained_like(S=S, K=K)
    tensors = p._tensors_for_file()
    fields = {"format_version": 1, "solver": "epd", "K": K, "S": S, "nfe": p.nfe,
              "schedule": None, "afs": True, "plugin": False, "max_order": 4,
              "package_version": "0.1.0", "meta": {}, "checksum": _checksum(tensors)}
    return tensors, fields


def test_raw_writer_is_valid(tmp_path):
    tensors, fields = _good_raw()
    _write_raw(tmp_path / "p.safetensors", tensors, fields)
    EPDParams.load(tmp_path / "p.safetensors")


def test_future_format_version(tmp_path):
    tensors, fields = _good_raw()
    fields["format_version"] = 2
    _write_raw(tmp_path / "p.safetensors", tensors, fields)
    with pytest.raises(ValueError, match="newer"):
        EPDParams.load(tmp_path / "p.safetensors")


@pytest.mark.parametrize("key", ["solver", "K", "nfe", "afs", "checksum", "meta"])
def test_missing_metadata_key(tmp_path, key):
    tensors, fields = _good_raw()
    del fields[key]
    _write_raw(tmp_path / "p.safetensors", tensors, fields)
    with pytest.raises(ValueError, match=f"missing the keys.*{key}"):
        EPDParams.load(tmp_path / "p.safetensors")


def test_not_an_epd_file(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not an EPD params file"):
        EPDParams.load(tmp_path / "x.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "y.safetensors"), metadata={"a": "b"})
    with pytest.raises(ValueError, match="format_version"):
        EPDParams.load(tmp_path / "y.safetensors")


@pytest.mark.parametrize("name", ["r", "weights", "delta", "o", "sigmas"])
def test_missing_tensor(tmp_path, name):
    tensors, fields = _good_raw()
    del tensors[name]
    fields["checksum"] = _checksum(tensors)
    _write_raw(tmp_path / "p.safetensors", tensors, fields)
    with pytest.raises(ValueError, match=f"missing tensors \\['{name}'\\]"):
        EPDParams.load(tmp_path / "p.safetensors")


@pytest.mark.parametrize("name,shape", [("r", (3, 3)), ("weights", (2, 2)), ("delta", (3,)),
                                        ("o", (3, 2)), ("sigmas", (3,))])
def test_wrong_shape(tmp_path, name, shape):
    tensors, fields = _good_raw()
    tensors[name] = torch.full(shape, 0.5, dtype=F64)
    fields["checksum"] = _checksum(tensors)
    _write_raw(tmp_path / "p.safetensors", tensors, fields)
    with pytest.raises(ValueError, match=f"tensor '{name}' has shape"):
        EPDParams.load(tmp_path / "p.safetensors")


@pytest.mark.parametrize("edit,match", [
    (lambda t, f: t["r"].fill_(2.0), "r must lie in"),
    (lambda t, f: f.update(nfe=9), "nfe = 9"),
    (lambda t, f: f.update(solver="euler"), "solver"),
    (lambda t, f: f.update(solver="epd-ipndm"), "contradicts"),
    (lambda t, f: f.update(afs="yes"), "afs"),
    (lambda t, f: f.update(K=2.5), "'K' must be an integer"),
    (lambda t, f: f.update(meta=[1]), "meta"),
    (lambda t, f: t.update(extra=torch.zeros(1)), "unexpected tensors"),
])
def test_bad_values_in_file(tmp_path, edit, match):
    tensors, fields = _good_raw()
    edit(tensors, fields)
    fields["checksum"] = _checksum(tensors)
    _write_raw(tmp_path / "p.safetensors", tensors, fields)
    with pytest.raises(ValueError, match=match):
        EPDParams.load(tmp_path / "p.safetensors")


def test_atomic_save_keeps_old_file_on_error(tmp_path):
    path = tmp_path / "p.safetensors"
    good = trained_like()
    good.save(path)
    before = path.read_bytes()
    bad = trained_like(meta={"f": object()})
    with pytest.raises(ValueError, match="JSON"):
        bad.save(path, overwrite=True)
    invalid = trained_like()
    invalid.r = invalid.r + 5
    with pytest.raises(ValueError, match="r must lie"):
        invalid.save(path, overwrite=True)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["p.safetensors"]


def test_load_to_device(tmp_path):
    path = tmp_path / "p.safetensors"
    trained_like().save(path)
    q = EPDParams.load(path, device="cpu")
    assert q.r.device.type == "cpu"


# --------------------------------------------------------------------------------------
# files written by earlier code (tests/data, see params_fixtures.py there)

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def _fixtures():
    import importlib.util
    spec = importlib.util.spec_from_file_location("params_fixtures",
                                                  os.path.join(DATA, "params_fixtures.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


FIXTURES = _fixtures()


def _header(path):
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("name", sorted(FIXTURES.RECIPES))
def test_files_written_by_earlier_code_still_load(name, tmp_path):
    import epd_kernels

    cls_name, recipe = FIXTURES.RECIPES[name]
    path = os.path.join(DATA, name)
    loaded = getattr(epd_kernels, cls_name).load(path)        # verifies the stored checksum
    for k, v in recipe.items():
        got = getattr(loaded, k)
        if k == "predictor":                                   # (config, state dict)
            config, state = v
            got_state = got.state_dict()
            assert got.config == config and sorted(got_state) == sorted(state)
            for n, t in state.items():
                assert got_state[n].dtype == t.dtype and torch.equal(got_state[n], t), n
        elif isinstance(v, torch.Tensor):
            assert got.dtype == v.dtype and torch.equal(got, v), k
        else:
            assert got == v, k
    old_meta, old_tensors = _header(path)
    # The digest the old writer stored is the one the current code computes.
    assert json.loads(old_meta["checksum"]) == _checksum(old_tensors)
    # And what the current code writes for the same object is what the old code wrote,
    # field by field (the bytes differ only in the header's key order and the version).
    loaded.save(tmp_path / name)
    new_meta, new_tensors = _header(tmp_path / name)
    assert new_meta.pop("package_version") and old_meta.pop("package_version")
    assert new_meta == old_meta
    assert sorted(new_tensors) == sorted(old_tensors)
    for k in old_tensors:
        assert new_tensors[k].dtype == old_tensors[k].dtype
        assert torch.equal(new_tensors[k], old_tensors[k]), k


def test_the_fixtures_cover_every_family_and_form():
    import epd_kernels

    loaded = [getattr(epd_kernels, c).load(os.path.join(DATA, n))
              for n, (c, _) in FIXTURES.RECIPES.items()]
    assert {p.solver for p in loaded} >= {"epd", "epd-ipndm", "d-heun", "amed", "amed-ipndm"}
    assert {p.form for p in loaded if hasattr(p, "form")} == {"table", "predictor"}


def test_other_kinds_of_params_file_name_their_reader(tmp_path):
    from epd_kernels.params import AMEDParams, DODEParams

    with pytest.raises(ValueError, match=r"not an EPD params file: metadata kind is 'd-ode'.*"
                                         r"DODEParams\.load"):
        EPDParams.load(os.path.join(DATA, "dode.safetensors"))
    AMEDParams.init(grid(3)).save(tmp_path / "amed.safetensors")
    with pytest.raises(ValueError, match=r"not an EPD params file.*AMEDParams\.load"):
        EPDParams.load(tmp_path / "amed.safetensors")
    with pytest.raises(ValueError, match=r"not a D-ODE params file.*AMEDParams\.load"):
        DODEParams.load(tmp_path / "amed.safetensors")
    with pytest.raises(ValueError, match=r"not a D-ODE params file.*EPDParams\.load"):
        DODEParams.load(os.path.join(DATA, "epd.safetensors"))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_save_refuses_non_finite_meta(tmp_path, bad):
    # NaN / Infinity are not JSON: other readers of the header would reject the file.
    path = tmp_path / "p.safetensors"
    trained_like().save(path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="EPDParams.meta / schedule must be JSON-serialisable"):
        trained_like(meta={"loss": bad}).save(path, overwrite=True)
    assert path.read_bytes() == before


# --------------------------------------------------------------------------------------
# overwriting, and the durability of the rename


def test_save_refuses_an_existing_file_unless_asked(tmp_path):
    path = tmp_path / "p.safetensors"
    first, second = trained_like(seed=1), trained_like(seed=2)
    first.save(path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match=r"p\.safetensors exists; pass overwrite=True"):
        second.save(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["p.safetensors"]     # no temporary left behind
    second.save(path, overwrite=True)
    assert_same(second, EPDParams.load(path))


def test_refusal_holds_when_the_file_appears_during_the_write(tmp_path, monkeypatch):
    """The early existence check can race with another writer; the final move (a hard link,
    which fails on an existing name) must still refuse, leaving the other file intact."""
    from epd_kernels import fileio

    path = tmp_path / "p.safetensors"
    real_mkstemp = fileio.tempfile.mkstemp

    def mkstemp_then_other_writer(*a, **kw):
        path.write_bytes(b"the other writer's file")
        return real_mkstemp(*a, **kw)

    monkeypatch.setattr(fileio.tempfile, "mkstemp", mkstemp_then_other_writer)
    with pytest.raises(FileExistsError, match="p.safetensors exists"):
        trained_like().save(path)
    assert path.read_bytes() == b"the other writer's file"
    assert sorted(os.listdir(tmp_path)) == ["p.safetensors"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_the_folder_is_fsynced_after_the_rename(tmp_path, monkeypatch, overwrite):
    import stat

    from epd_kernels import fileio

    path = tmp_path / "p.safetensors"
    if overwrite:
        path.write_bytes(b"old")
    events = []
    real_fsync, real_replace, real_link = os.fsync, os.replace, os.link

    def fsync(fd):
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        events.append(("fsync-dir" if is_dir else "fsync-file", path.exists() and
                       path.read_bytes() != b"old"))
        return real_fsync(fd)

    def move(real):
        def moved(*a, **kw):
            events.append(("move", None))
            return real(*a, **kw)
        return moved

    monkeypatch.setattr(fileio.os, "fsync", fsync)
    monkeypatch.setattr(fileio.os, "replace", move(real_replace))
    monkeypatch.setattr(fileio.os, "link", move(real_link))
    trained_like().save(path, overwrite=overwrite)
    kinds = [k for k, _ in events]
    assert kinds == ["fsync-file", "move", "fsync-dir"], events
    assert events[-1] == ("fsync-dir", True)          # after the new file is in place
    EPDParams.load(path)


# --------------------------------------------------------------------------------------
# corrupt files: always a one-line ValueError that starts with the file's path


def _raw_file(path, tensors, meta_strings):
    save_file(tensors, str(path), metadata=meta_strings)


def _nested(depth):
    """A JSON value whose arrays nest `depth` levels."""
    v = 0
    for _ in range(depth):
        v = [v]
    return v


def test_nesting_in_metadata_is_bounded(tmp_path):
    from epd_kernels.fileio import MAX_JSON_DEPTH

    assert MAX_JSON_DEPTH == 32
    path = tmp_path / "p.safetensors"
    ok = trained_like(meta={"deep": _nested(MAX_JSON_DEPTH - 1)})   # meta itself is a level
    ok.save(path)
    assert EPDParams.load(path).meta == ok.meta
    with pytest.raises(ValueError, match="EPDParams.meta nests deeper than 32 levels"):
        trained_like(meta={"deep": _nested(MAX_JSON_DEPTH)}).save(path, overwrite=True)
    with pytest.raises(ValueError, match="EPDParams.meta / schedule must be JSON-serialisable"):
        trained_like(meta={"deep": _nested(100_000)}).save(path, overwrite=True)  # RecursionError
    assert EPDParams.load(path).meta == ok.meta       # the refused saves left the file alone
    tensors, fields = _good_raw()
    for depth in (MAX_JSON_DEPTH + 1, 100_000):       # json.loads would recurse 100000 deep
        strings = {k: json.dumps(v) for k, v in fields.items()}
        strings["meta"] = "[" * depth + "]" * depth
        _raw_file(path, tensors, strings)
        with pytest.raises(ValueError) as e:
            EPDParams.load(path)
        assert str(e.value) == (f"{path}: metadata field 'meta' nests JSON deeper than 32 "
                                f"levels")
    # brackets inside JSON strings are text, not nesting
    brackets = trained_like(meta={"note": "[" * 100 + "{" * 100})
    brackets.save(path, overwrite=True)
    assert EPDParams.load(path).meta == brackets.meta


def test_nesting_in_the_header_itself_is_bounded(tmp_path):
    """The safetensors header is JSON too: a deep value there (damage, or a hostile file)
    is a ValueError naming the file, not a RecursionError."""
    path = tmp_path / "p.safetensors"
    for depth in (33, 100_000):
        header = ('{"__metadata__": {"format_version": "1"}, "x": ' + "[" * depth + "]" * depth
                  + "}").encode()
        path.write_bytes(len(header).to_bytes(8, "little") + header)
        with pytest.raises(ValueError, match=r"p\.safetensors: corrupted safetensors header: "
                                             r"the safetensors header nests JSON deeper than 32"):
            EPDParams.load(path)


def test_a_folder_is_named_as_such(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder, not an EPD params file"):
        EPDParams.load(tmp_path)


def _family_files(tmp_path):
    """One valid file of each family and form: (class, path)."""
    import epd_kernels

    return [(getattr(epd_kernels, c), os.path.join(DATA, n))
            for n, (c, _) in sorted(FIXTURES.RECIPES.items())]


def _assert_one_line_naming(err, path):
    msg = str(err)
    assert msg.startswith(f"{path}: ") and "\n" not in msg, msg


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 4), where=st.floats(0, 1, exclude_max=True),
       byte=st.integers(0, 255), cut=st.booleans())
def test_any_damage_is_a_one_line_error_naming_the_file(tmp_path, which, where, byte, cut):
    """One byte changed anywhere (or the file cut there), in a file of each family: the load
    either still succeeds (the byte did not change, or the header stays valid JSON with
    valid values) or raises a ValueError of one line that starts with the path; never
    another exception type."""
    cls, src = _family_files(tmp_path)[which]
    data = bytearray(open(src, "rb").read())
    i = int(where * len(data))
    if cut:
        data = data[:i]
    else:
        data[i] = byte
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(bytes(data))
    try:
        cls.load(path)
    except ValueError as e:
        _assert_one_line_naming(e, path)
    else:
        assert not cut


def test_checksum_and_truncation_errors_of_every_family_are_one_line(tmp_path):
    for cls, src in _family_files(tmp_path):
        data = open(src, "rb").read()
        path = tmp_path / "d.safetensors"
        for bad in (data[:-1], data[:9], data[:-4] + bytes(b ^ 1 for b in data[-4:])):
            path.write_bytes(bad)
            with pytest.raises(ValueError) as e:
                cls.load(path)
            _assert_one_line_naming(e.value, path)
