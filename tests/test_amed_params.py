"""AMEDParams (table and predictor form): construction, validation, compatibility, files
(round trips and every broken-file case)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from epd_kernels import AMEDParams, DODEParams, EPDParams, get_sigmas, make_noise
from epd_kernels.solvers.amed import amed_sampler
from epd_kernels.models import GaussianModel
from epd_kernels.params import AMEDPredictor
from epd_kernels.params.file import checksum

F64 = torch.float64


def grid(S=3):
    return get_sigmas("polynomial", S)


def table(S=3, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return AMEDParams(sigmas=grid(S), r=torch.rand(S, generator=g, dtype=F64),
                      delta=0.1 * torch.randn(S, generator=g, dtype=F64),
                      o=0.005 * torch.randn(S, generator=g, dtype=F64), **kw).validate()


def predictor(S=3, seed=0, F=6, **kw):
    p = AMEDParams.init(grid(S), form="predictor", feature_dim=F, hidden=16, seed=seed, **kw)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # "trained": every weight non-trivial
        for q in p.predictor.parameters():
            q.add_(0.3 * torch.randn(q.shape, generator=g, dtype=q.dtype))
    return p.validate()


# --------------------------------------------------------------------------------------
# construction and checks


def test_init_is_neutral_in_both_forms():
    t = AMEDParams.init(grid(4))
    assert t.form == "table" and t.num_steps == 4 and t.nfe == 7 and t.afs
    assert torch.equal(t.r, torch.full((4,), 0.5, dtype=F64)) and not t.delta.any()
    assert t.solver == "amed" and t.total_evaluations == 7 and t.features is None
    p = AMEDParams.init(grid(4), form="predictor", shape=(3, 16, 16), plugin=True, afs=False)
    assert p.form == "predictor" and p.feature_dim == 64 and p.features == "denoised"
    assert p.solver == "amed-ipndm" and p.nfe == 8
    r, delta, o = p.step_values(2, torch.randn(5, 64, dtype=F64))
    assert torch.equal(r, torch.full((5,), 0.5, dtype=F64))
    zeros = torch.zeros(5, dtype=F64)
    assert torch.equal(delta, zeros) and torch.equal(o, zeros)
    assert p.predictor.config == {"feature_dim": 64, "hidden": 128, "bottleneck": 4,
                                  "time_channels": 8, "delta_max": 0.2, "o_max": 0.01}
    assert t.step_values(1) == (t.r[1], t.delta[1], t.o[1])
    # seeded weights: equal for equal seeds, different otherwise; the global RNG is untouched
    state = torch.get_rng_state()
    a = AMEDParams.init(grid(), form="predictor", feature_dim=8, seed=1)
    assert torch.equal(state, torch.get_rng_state())
    b = AMEDParams.init(grid(), form="predictor", feature_dim=8, seed=1)
    c = AMEDParams.init(grid(), form="predictor", feature_dim=8, seed=2)
    assert torch.equal(a.predictor.enc0.weight, b.predictor.enc0.weight)
    assert not torch.equal(a.predictor.enc0.weight, c.predictor.enc0.weight)


def test_predictor_bounds_are_the_papers():
    p = predictor()
    with torch.no_grad():
        for head in (p.predictor.head_delta, p.predictor.head_o):
            head.bias.fill_(50.0)
    _, delta, o = p.step_values(0, torch.randn(4, 6, dtype=F64))
    assert (delta <= 0.2).all() and (delta > 0.19).all()   # scale_time in (0.8, 1.2)
    assert (o <= 0.01).all() and (o > 0.0099).all()        # scale_dir in (0.99, 1.01)


@pytest.mark.parametrize("kw,match", [
    (dict(form="nope"), "form must be"),
    (dict(form="predictor"), "feature_dim"),
    (dict(form="predictor", features="pixels", feature_dim=3), "features must be"),
    (dict(form="predictor", feature_dim=0), "feature_dim must be an integer"),
    (dict(form="predictor", feature_dim=4, delta_max=1.5), "delta_max must be in"),
    (dict(form="predictor", feature_dim=4, time_channels=7), "even"),
    (dict(max_order=5), "max_order"),
])
def test_init_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        AMEDParams.init(grid(), **kw)


@pytest.mark.parametrize("change,match", [
    (dict(r=torch.tensor([0.5, 1.5, 0.5], dtype=F64)), "r must lie in"),
    (dict(delta=torch.tensor([0.0, -1.0, 0.0], dtype=F64)), "delta must be > -1"),
    (dict(o=torch.tensor([0.0, float("nan"), 0.0], dtype=F64)), "o has non-finite"),
    (dict(o=torch.zeros(4, dtype=F64)), r"o must have shape \[S\] = \[3\]"),
    (dict(r=None), "missing \\['r'\\]"),
    (dict(nfe=6), "nfe = 6 does not match"),
    (dict(sigmas=torch.tensor([80.0, 1.0, 5.0, 0.002], dtype=F64)), "strictly decreasing"),
    (dict(features="denoised"), "read no features"),
    (dict(predictor=AMEDPredictor(3)), "one form only"),
    (dict(meta=[1]), "meta must be a dict"),
])
def test_validate_names_the_problem(change, match):
    with pytest.raises(ValueError, match=match):
        table().replace(**change).validate()


def test_check_compatible():
    p = table(afs=True)
    p.check_compatible(nfe=5, sigmas=grid(), plugin=False, afs=True)
    with pytest.raises(ValueError, match="NFE 7 was asked"):
        p.check_compatible(nfe=7)
    with pytest.raises(ValueError, match="4 sigmas .* grid given has 5"):
        p.check_compatible(sigmas=grid(4))
    with pytest.raises(ValueError, match=r"different time grid: sigma\[1\]"):
        p.check_compatible(sigmas=get_sigmas("logsnr", 3))
    with pytest.raises(ValueError, match=r"'amed' \(plugin=False\), not 'amed-ipndm'"):
        p.check_compatible(plugin=True)
    with pytest.raises(ValueError, match="afs=False"):
        p.check_compatible(afs=False)


def test_detach_to_and_with_features():
    p = predictor()
    q = p.detach()
    assert q.predictor is not p.predictor
    pairs = zip(p.predictor.parameters(), q.predictor.parameters())
    assert all(torch.equal(a, b) for a, b in pairs)
    f = p.to(dtype=torch.float32)
    assert f.predictor.enc0.weight.dtype == torch.float32 and p.predictor.enc0.weight.dtype == F64
    with pytest.raises(ValueError, match="read no features"):
        table().with_features("denoised")
    assert p.with_features("module:x.y").features == "module:x.y"


# --------------------------------------------------------------------------------------
# files: round trips


def test_table_roundtrip(tmp_path):
    p = table(plugin=True, max_order=3, schedule={"kind": "polynomial", "rho": 7.0},
              meta={"teacher": "dpm2", "final_loss": 0.25})
    p.save(tmp_path / "t.safetensors")
    q = AMEDParams.load(tmp_path / "t.safetensors")
    for n in ("r", "delta", "o", "sigmas"):
        assert torch.equal(getattr(p, n), getattr(q, n)), n
    for n in ("nfe", "afs", "plugin", "max_order", "schedule", "meta", "form", "features"):
        assert getattr(p, n) == getattr(q, n), n


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_predictor_roundtrip_gives_identical_outputs(tmp_path, dtype):
    p = predictor(afs=False, meta={"note": "x"}).to(dtype=dtype)
    p.save(tmp_path / "p.safetensors")
    q = AMEDParams.load(tmp_path / "p.safetensors")
    assert q.form == "predictor" and q.features == "denoised"
    assert q.predictor.config == p.predictor.config
    assert q.predictor.enc0.weight.dtype == dtype and q.meta == {"note": "x"} and not q.afs
    feats = torch.randn(7, 6, dtype=F64)
    for n in range(3):
        for a, b in zip(p.step_values(n, feats), q.step_values(n, feats)):
            assert torch.equal(a, b)
    model = GaussianModel(torch.zeros(6, dtype=F64), torch.ones(6, dtype=F64))
    x = make_noise(range(3), (6,), dtype=F64) * 80
    torch.testing.assert_close(amed_sampler(model, x, params=q), amed_sampler(model, x, params=p),
                               rtol=0, atol=0)


def test_module_features_roundtrip(tmp_path):
    p = AMEDParams.init(grid(), form="predictor", features="module:net.mid2", feature_dim=4)
    p.save(tmp_path / "m.safetensors")
    assert AMEDParams.load(tmp_path / "m.safetensors").features == "module:net.mid2"


def test_callable_features_need_a_name(tmp_path):
    def fn(x, sigma, denoised):
        return x[:, :6]

    p = predictor(features=fn)
    path = tmp_path / "c.safetensors"
    with pytest.raises(ValueError, match="feature_name"):
        p.save(path)
    assert not path.exists()
    p.save(path, feature_name="first-six")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    assert json.loads(header["__metadata__"]["features"]) == "callable:first-six"
    bare = AMEDParams.load(path)
    assert bare.features == "callable:first-six"
    model = GaussianModel(torch.zeros(6, dtype=F64), torch.ones(6, dtype=F64))
    x = make_noise(range(2), (6,), dtype=F64) * 80
    with pytest.raises(ValueError, match="'first-six'.*features=fn"):
        amed_sampler(model, x, params=bare)
    ref = amed_sampler(model, x, params=p)
    for q in (AMEDParams.load(path, features=fn), bare.with_features(fn)):
        torch.testing.assert_close(amed_sampler(model, x, params=q), ref, rtol=0, atol=0)
    predictor().save(tmp_path / "d.safetensors")  # features "denoised": nothing to supply
    with pytest.raises(ValueError, match="only for files saved with a named callable"):
        AMEDParams.load(tmp_path / "d.safetensors", features=fn)


# --------------------------------------------------------------------------------------
# files: every bad case


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="AMED params file not found"):
        AMEDParams.load(tmp_path / "none.safetensors")


@pytest.mark.parametrize("form", ["table", "predictor"])
@pytest.mark.parametrize("cut", [0, 5, 8, 40, -7])
def test_truncated_file(tmp_path, form, cut):
    p = table() if form == "table" else predictor()
    path = tmp_path / "p.safetensors"
    p.save(path)
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut >= 0 else data[:len(data) + cut])
    with pytest.raises(ValueError, match="truncated|corrupted"):
        AMEDParams.load(path)


def test_garbage_and_corrupted_bytes(tmp_path):
    path = tmp_path / "p.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(ValueError, match="corrupted safetensors header"):
        AMEDParams.load(path)
    predictor().save(path, overwrite=True)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # flip bits inside the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        AMEDParams.load(path)


def _raw(form="table"):
    p = table() if form == "table" else predictor()
    tensors = p._tensors_for_file()
    fields = {"format_version": 1, "kind": "amed", "solver": "amed",
              "form": form, "S": 3, "nfe": 5, "afs": True, "plugin": False, "max_order": 4,
              "schedule": None, "features": None if form == "table" else "denoised",
              "predictor": None if form == "table" else p.predictor.config,
              "package_version": "0.1.0", "meta": {}, "checksum": checksum(tensors)}
    return tensors, fields


def _write(path, tensors, fields, rechecksum=True):
    if rechecksum:
        fields["checksum"] = checksum(tensors)
    save_file(tensors, str(path), metadata={k: json.dumps(v) for k, v in fields.items()})


@pytest.mark.parametrize("form", ["table", "predictor"])
def test_raw_writer_is_valid(tmp_path, form):
    _write(tmp_path / "p.safetensors", *_raw(form))
    assert AMEDParams.load(tmp_path / "p.safetensors").form == form


def test_future_format_version(tmp_path):
    tensors, fields = _raw()
    fields["format_version"] = AMEDParams.FORMAT_VERSION + 1
    _write(tmp_path / "p.safetensors", tensors, fields)
    with pytest.raises(ValueError, match="newer than this epd_kernels supports"):
        AMEDParams.load(tmp_path / "p.safetensors")


@pytest.mark.parametrize("key", ["solver", "form", "nfe", "afs", "checksum", "meta", "predictor"])
def test_missing_metadata_key(tmp_path, key):
    tensors, fields = _raw()
    del fields[key]
    _write(tmp_path / "p.safetensors", tensors, fields, rechecksum=key != "checksum")
    with pytest.raises(ValueError, match=f"missing the keys.*{key}"):
        AMEDParams.load(tmp_path / "p.safetensors")


def test_files_of_other_kinds(tmp_path):
    EPDParams.init(grid(), 2).save(tmp_path / "epd.safetensors")
    with pytest.raises(ValueError, match="not an AMED params file.*EPDParams.load"):
        AMEDParams.load(tmp_path / "epd.safetensors")
    DODEParams.zeros(grid()).save(tmp_path / "dode.safetensors")
    with pytest.raises(ValueError, match="not an AMED params file.*DODEParams.load"):
        AMEDParams.load(tmp_path / "dode.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not an AMED params file"):
        AMEDParams.load(tmp_path / "plain.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "meta.safetensors"), metadata={"a": "b"})
    with pytest.raises(ValueError, match="format_version"):
        AMEDParams.load(tmp_path / "meta.safetensors")
    # and the other loaders refuse an AMED file
    table().save(tmp_path / "amed.safetensors")
    with pytest.raises(ValueError):
        EPDParams.load(tmp_path / "amed.safetensors")
    with pytest.raises(ValueError, match="kind"):
        DODEParams.load(tmp_path / "amed.safetensors")


@pytest.mark.parametrize("form,edit,match", [
    ("table", lambda t, f: t.pop("delta"), r"missing tensors \['delta'\]"),
    ("table", lambda t, f: t.update(extra=torch.zeros(1)), r"unexpected tensors \['extra'\]"),
    ("table", lambda t, f: t.update(r=torch.full((4,), 0.5, dtype=F64)), "tensor 'r' has shape"),
    ("table", lambda t, f: t.update(sigmas=t["sigmas"][:3]), "tensor 'sigmas' has shape"),
    ("table", lambda t, f: t["r"].fill_(2.0), "r must lie in"),
    ("table", lambda t, f: f.update(nfe=7), "nfe = 7 does not match"),
    ("table", lambda t, f: f.update(solver="epd"), "solver must be"),
    ("table", lambda t, f: f.update(solver="amed-ipndm"), "contradicts"),
    ("table", lambda t, f: f.update(form="lut"), "form must be"),
    ("table", lambda t, f: f.update(afs="yes"), "'afs' must be true/false"),
    ("table", lambda t, f: f.update(S=2.5), "'S' must be an integer"),
    ("table", lambda t, f: f.update(meta=[1]), "meta"),
    ("table", lambda t, f: f.update(features="denoised"), "features and predictor null"),
    ("predictor", lambda t, f: t.pop("predictor.enc0.weight"), "missing tensors"),
    ("predictor", lambda t, f: t.update({"predictor.enc0.weight": torch.zeros(16, 7, dtype=F64)}),
     "'predictor.enc0.weight' has shape"),
    ("predictor", lambda t, f: f.update(predictor={"feature_dim": 6}), "keys"),
    ("predictor", lambda t, f: f["predictor"].update(o_max=2.0), "not a valid AMEDPredictor"),
    ("predictor", lambda t, f: f.update(features="pixels"), "metadata 'features'"),
    ("predictor", lambda t, f: t["predictor.head_r.bias"].fill_(float("inf")), "non-finite"),
    ("predictor", lambda t, f: t.update({"predictor.head_r.bias":
                                         torch.zeros(1, dtype=torch.int64)}),
     "one floating dtype"),
])
def test_bad_values_in_file(tmp_path, form, edit, match):
    tensors, fields = _raw(form)
    edit(tensors, fields)
    _write(tmp_path / "p.safetensors", tensors, fields)
    with pytest.raises(ValueError, match=match):
        AMEDParams.load(tmp_path / "p.safetensors")


def test_atomic_save_keeps_old_file_on_error(tmp_path):
    path = tmp_path / "p.safetensors"
    table().save(path)
    before = path.read_bytes()
    bad = table().replace(r=torch.full((3,), 3.0, dtype=F64))
    with pytest.raises(ValueError, match="r must lie in"):
        bad.save(path, overwrite=True)
    unserialisable = table().replace(meta={"x": object()})
    with pytest.raises(ValueError, match="JSON"):
        unserialisable.save(path, overwrite=True)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        table(seed=1).save(path)
    assert path.read_bytes() == before
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".tmp")]


def test_load_to_device(tmp_path):
    predictor().save(tmp_path / "p.safetensors")
    q = AMEDParams.load(tmp_path / "p.safetensors", device="cpu")
    assert q.predictor.enc0.weight.device.type == "cpu"
