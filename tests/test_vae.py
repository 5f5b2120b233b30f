"""The Flax SD-VAE against diffusers' PyTorch AutoencoderKL on the same weights.

A tiny random-weight AutoencoderKL (3 levels, so a 32x32 image gives a 8x8
latent) is saved as a diffusers directory, loaded with `load_vae`, and both
networks see the same input. Also: the torch-free save/load round trip.
"""

import json

import jax
import numpy as np
import pytest

from mf_jax.models import vae

TINY = dict(block_out_channels=(8, 16, 16), layers_per_block=1,
            latent_channels=4, norm_num_groups=4)


@pytest.fixture(scope="module")
def torch_vae(tmp_path_factory):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(0)
  n = len(TINY["block_out_channels"])
  model = diffusers.AutoencoderKL(
      down_block_types=("DownEncoderBlock2D",) * n,
      up_block_types=("UpDecoderBlock2D",) * n, **TINY).eval()
  with torch.no_grad():  # random norms and biases too, not just 1 and 0
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  path = tmp_path_factory.mktemp("vae")
  model.save_pretrained(path, safe_serialization=True)
  return torch, model, path


def _rel_err(a, b):
  return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))


def test_encoder_and_decoder_match_diffusers(torch_vae):
  torch, model, path = torch_vae
  module, params = vae.load_vae(str(path))
  assert tuple(module.block_out_channels) == TINY["block_out_channels"]
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  latents = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  with torch.no_grad():
    dist = model.encode(torch.from_numpy(images).permute(0, 3, 1, 2))
    want_mean = dist.latent_dist.mean.permute(0, 2, 3, 1).numpy()
    want_std = dist.latent_dist.std.permute(0, 2, 3, 1).numpy()
    want_img = model.decode(torch.from_numpy(latents).permute(0, 3, 1, 2))
    want_img = want_img.sample.permute(0, 2, 3, 1).numpy()

  mean, std = vae.encode(module, params, images)
  assert mean.shape == std.shape == (2, 8, 8, 4)
  assert _rel_err(np.asarray(mean), want_mean) < 1e-4
  assert _rel_err(np.asarray(std), want_std) < 1e-4
  raw = np.asarray(vae.decode(module, params, latents, clip=False))
  assert raw.shape == (2, 32, 32, 3)
  assert _rel_err(raw, want_img) < 1e-4
  clipped = np.asarray(vae.decode(module, params, latents))
  np.testing.assert_array_equal(clipped, np.clip(raw, -1, 1))


def test_legacy_attention_names_load_the_same(torch_vae, tmp_path):
  """sd-vae-ft-mse's file uses query/key/value/proj_attn names."""
  _, _, path = torch_vae
  from safetensors.numpy import load_file, save_file
  state = load_file(str(path / vae.WEIGHTS_NAME))
  renames = {"to_q": "query", "to_k": "key", "to_v": "value",
             "to_out.0": "proj_attn"}
  legacy = {}
  for key, value in state.items():
    for new, old in renames.items():
      key = key.replace(f".{new}.", f".{old}.")
    legacy[key] = value
  assert any(".proj_attn." in k for k in legacy)
  save_file(legacy, str(tmp_path / "legacy.safetensors"))
  (tmp_path / "config.json").write_text((path / "config.json").read_text())
  _, want = vae.load_vae(str(path))
  _, got = vae.load_vae(str(tmp_path / "legacy.safetensors"))
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_save_load_round_trip_without_torch(tmp_path):
  module = vae.AutoencoderKL(**TINY)
  params = vae.random_params(module, seed=1)
  weights = vae.save_vae(str(tmp_path), params, module)
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["block_out_channels"] == [8, 16, 16]
  loaded_module, loaded = vae.load_vae(weights)
  assert loaded_module == module
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_mismatched_config_is_a_clear_error(torch_vae, tmp_path):
  _, _, path = torch_vae
  (tmp_path / vae.WEIGHTS_NAME).write_bytes(
      (path / vae.WEIGHTS_NAME).read_bytes())  # no config: SD default arch
  with pytest.raises(ValueError, match="VAE weight"):
    vae.load_vae(str(tmp_path))


def test_default_config_takes_every_sd_vae_weight():
  """The real sd-vae-ft-mse file (default config, no config.json) loads:
  diffusers' SD VAE key set and shapes, built on torch's meta device."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  n = 4
  with torch.device("meta"):
    model = diffusers.AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, norm_num_groups=32)
  shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  module = vae.module_from_config({})
  abstract = vae.abstract_params(module)
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
  assert count == sum(int(np.prod(s)) for s in shapes.values()) == 83_653_863
  zeros = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
  params = vae.from_diffusers(zeros, module)  # raises on any mismatch
  assert set(vae.to_diffusers(params)) == set(shapes)


def test_check_weights_reads_headers_and_says_what_is_wrong(torch_vae,
                                                            tmp_path):
  """The start-up check (a few shapes from the safetensors header and the
  config) accepts diffusers' own files and names each kind of mismatch."""
  _, _, path = torch_vae
  assert vae.check_weights(str(path)) == TINY["latent_channels"]
  module = vae.AutoencoderKL(**TINY)
  weights = vae.save_vae(str(tmp_path / "ours"), vae.random_params(module),
                         module)
  assert vae.check_weights(weights, latent_channels=4) == 4
  with pytest.raises(ValueError, match="decodes 4-channel latents but the "
                     "model makes 16"):
    vae.check_weights(weights, latent_channels=16)
  config = json.loads((tmp_path / "ours" / "config.json").read_text())
  config["latent_channels"] = 8
  (tmp_path / "ours" / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="takes 4 latent channels but its "
                     "config says 8"):
    vae.check_weights(str(tmp_path / "ours"))
  with pytest.raises(FileNotFoundError, match="No VAE weights"):
    vae.check_weights(str(tmp_path / "missing"))
