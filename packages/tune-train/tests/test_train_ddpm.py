"""The DDPM noise scheme (epsilon / v-prediction, min-SNR) against closed forms and diffusers."""

from __future__ import annotations

import math

import pytest
import torch

from tune_train import ddpm


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_match_diffusers(schedule):
    from diffusers import DDPMScheduler

    config = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": schedule}
    ours = ddpm.alphas_cumprod_from_config(config)
    torch.testing.assert_close(ours.float(), DDPMScheduler(**config).alphas_cumprod, rtol=1e-5, atol=1e-6)


def test_zero_terminal_snr_schedules_are_refused():
    with pytest.raises(NotImplementedError, match="rescale_betas_zero_snr"):
        ddpm.alphas_cumprod_from_config({"rescale_betas_zero_snr": True})


def scheme(**kwargs) -> ddpm.DDPMScheme:
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return ddpm.DDPMScheme.from_scheduler(scheduler, **kwargs)


def test_noising_and_targets_match_diffusers():
    from diffusers import DDPMScheduler

    reference = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    eps, v = scheme(prediction_type="epsilon"), scheme(prediction_type="v_prediction")
    assert eps.prediction_type == "epsilon" and scheme().prediction_type == "epsilon"  # the scheduler config's
    torch.testing.assert_close(eps.add_noise(x0, noise, t), reference.add_noise(x0, noise, t))
    assert torch.equal(eps.target(x0, noise, t), noise)
    torch.testing.assert_close(v.target(x0, noise, t), reference.get_velocity(x0, noise, t))


def test_snr_and_min_snr_weights_closed_form():
    s = scheme()
    t = torch.tensor([10, 400, 900])
    a = s.alphas_cumprod[t]
    torch.testing.assert_close(s.snr(t), a / (1 - a))
    snr, gamma = torch.tensor([0.5, 5.0, 50.0], dtype=torch.float64), 5.0
    expected = {
        ("epsilon", False): [1.0, 1.0, 0.1],
        ("v_prediction", False): [0.5 / 1.5, 5 / 6, 5 / 51],
        ("epsilon", True): [5 / 5.5, 0.5, 5 / 55],  # gamma / (snr + gamma)
        ("v_prediction", True): [2.5 / 5.5 / 1.5, 2.5 / 6, 250 / 55 / 51],
    }
    for (prediction, soft), values in expected.items():
        weights = ddpm.min_snr_weights(snr, gamma, prediction, soft=soft)
        torch.testing.assert_close(weights, torch.tensor(values, dtype=torch.float64))
    with pytest.raises(ValueError, match="snr_gamma"):
        ddpm.min_snr_weights(snr, 0.0, "epsilon")


def test_loss_weights_each_sample():
    s = scheme(prediction_type="v_prediction", snr_gamma=5.0)
    prediction, target = torch.zeros(2, 1, 2, 2), torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 2.0)])
    t = torch.tensor([20, 800])
    snr = s.snr(t)
    weights = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / (snr + 1)
    expected = (torch.tensor([1.0, 4.0], dtype=torch.float64) * weights).mean()
    assert math.isclose(s.loss(prediction, target, t).item(), expected.item(), rel_tol=1e-6)
    # the almost clean timestep (SNR above gamma) is capped, the noisy one keeps SNR / (SNR + 1)
    assert snr[0] > 5 > snr[1]
    assert weights[0].item() == pytest.approx(5 / (snr[0].item() + 1))
    assert weights[1].item() == pytest.approx(snr[1].item() / (snr[1].item() + 1))
    plain = scheme(prediction_type="v_prediction")
    assert plain.loss(prediction, target, t).item() == pytest.approx(2.5)


def test_timesteps_are_reproducible_and_refiner_range():
    s = scheme()
    first = s.sample_timesteps(64, torch.Generator().manual_seed(3))
    assert torch.equal(first, s.sample_timesteps(64, torch.Generator().manual_seed(3)))
    assert first.min() >= 0 and first.max() < 1000 and first.dtype == torch.int64
    s.max_timestep = 200
    assert s.sample_timesteps(256, torch.Generator().manual_seed(3)).max() < 200
    with pytest.raises(ValueError, match="prediction_type"):
        scheme(prediction_type="sample")


class _Flow:
    name, prediction = "flowy", "flow"


class _Config:
    prediction_type = None
    snr_gamma = None
    use_soft_min_snr = False
    refiner_training = False
    refiner_training_strength = 0.2


def test_scheme_for_picks_by_declaration_not_name():
    assert ddpm.scheme_for(_Flow(), None, _Config()) is None
    bad = _Config()
    bad.prediction_type = "epsilon"
    with pytest.raises(ValueError, match="prediction_type 'epsilon' does not apply"):
        ddpm.scheme_for(_Flow(), None, bad)

    from diffusers import EulerDiscreteScheduler

    from tune_models.family import LoadedModel, ModelFamily

    class UNetFamily(ModelFamily):
        name, prediction = "some-unet", "epsilon"

    family = UNetFamily()
    model = LoadedModel(family=family, flavour=None, transformer=None, vae=None, text_encoder=None, tokenizer=None,
                        scheduler=EulerDiscreteScheduler(prediction_type="epsilon"))
    config = _Config()
    config.prediction_type, config.snr_gamma, config.refiner_training = "v_prediction", 5.0, True
    chosen = ddpm.scheme_for(family, model, config)
    assert chosen.prediction_type == "v_prediction" and model.extras["prediction_type"] == "v_prediction"
    assert chosen.snr_gamma == 5.0 and chosen.max_timestep == 200
    config.use_soft_min_snr, config.snr_gamma = True, None
    with pytest.raises(ValueError, match="use_soft_min_snr needs snr_gamma"):
        ddpm.scheme_for(family, model, config)


def test_inverted_refiner_schedule_trains_the_noisy_rest_of_the_timesteps():
    """``refiner_training_invert_schedule`` trains from ``refiner_training_strength`` of the
    schedule up to pure noise (a first-stage expert), the complement of the refiner's range."""
    from diffusers import EulerDiscreteScheduler

    from tune_models.family import LoadedModel, ModelFamily

    class UNetFamily(ModelFamily):
        name, prediction = "some-unet", "epsilon"

    family = UNetFamily()
    model = LoadedModel(family=family, flavour=None, transformer=None, vae=None, text_encoder=None, tokenizer=None,
                        scheduler=EulerDiscreteScheduler())
    config = _Config()
    config.refiner_training, config.refiner_training_strength = True, 0.35
    config.refiner_training_invert_schedule = True
    inverted = ddpm.scheme_for(family, model, config)
    drawn = inverted.sample_timesteps(2048, torch.Generator().manual_seed(0))
    assert inverted.min_timestep == 350 and inverted.max_timestep is None
    assert drawn.min() >= 350 and drawn.max() == 999 and drawn.min() < 360
    config.refiner_training_invert_schedule = False
    plain = ddpm.scheme_for(family, model, config)
    assert plain.min_timestep == 0 and plain.max_timestep == 350
    assert plain.sample_timesteps(2048, torch.Generator().manual_seed(0)).max() == 349


def test_zero_terminal_snr_scheduler_trains_with_its_own_alphas():
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       rescale_betas_zero_snr=True, prediction_type="v_prediction")
    s = ddpm.DDPMScheme.from_scheduler(scheduler, snr_gamma=5.0)
    assert s.prediction_type == "v_prediction"
    t = torch.tensor([0, 999])
    assert s.snr(t)[1] < 1e-6  # (almost) pure noise at the last step
    x0, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    loss = s.loss(torch.zeros_like(x0), s.target(x0, noise, t), t)
    assert torch.isfinite(loss)


# -- Diff2Flow: an epsilon / v prediction trained against the flow velocity ----------------------


def _pair_and_timesteps():
    generator = torch.Generator().manual_seed(7)
    x0, noise = torch.randn(4, 4, 8, 8, generator=generator), torch.randn(4, 4, 8, 8, generator=generator)
    return x0, noise, torch.tensor([0, 250, 600, 999])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diff2flow_perfect_native_prediction_is_the_exact_flow_velocity(prediction_type):
    """The network's exact target, converted, is exactly ``noise - x0`` of the same pair, at every
    timestep (including the noisiest, where epsilon's x0 estimate divides by a small sqrt(a))."""
    native = scheme(prediction_type=prediction_type)
    bridged = scheme(prediction_type=prediction_type, diff2flow=True)
    x0, noise, t = _pair_and_timesteps()
    noisy = native.add_noise(x0, noise, t)
    perfect = native.target(x0, noise, t)  # noise (epsilon) or sqrt(a) noise - sqrt(1-a) x0 (v)
    velocity = bridged.flow_velocity(perfect, noisy, t)
    torch.testing.assert_close(velocity, noise - x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bridged.target(x0, noise, t), noise - x0)
    assert bridged.loss(perfect, bridged.target(x0, noise, t), t, noisy=noisy).item() < 1e-7
    # the noising itself is unchanged: diff2flow changes the objective, not the model's input
    torch.testing.assert_close(bridged.add_noise(x0, noise, t), noisy)


def test_diff2flow_epsilon_error_closed_form():
    """An epsilon error ``d`` becomes a velocity error ``d * (1 + sqrt(1-a) / sqrt(a))``: the loss
    is the native MSE reweighted toward the noisy timesteps, by that factor squared."""
    bridged = scheme(prediction_type="epsilon", diff2flow=True)
    x0, noise, t = _pair_and_timesteps()
    noisy = bridged.add_noise(x0, noise, t)
    error = torch.full_like(noise, 0.1)
    velocity = bridged.flow_velocity(noise + error, noisy, t)
    a = bridged.alphas_cumprod[t].float()
    factor = (1 + (1 - a).sqrt() / a.sqrt()).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(velocity - (noise - x0), error * factor, rtol=1e-4, atol=1e-4)
    expected = ((0.1 * factor) ** 2).mean().item()  # every element of a sample has the same error
    loss = bridged.loss(noise + error, bridged.target(x0, noise, t), t, noisy=noisy)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert factor[-1].item() > 10 * factor[0].item()  # t=999 weighs far more than t=0


def test_diff2flow_v_prediction_error_closed_form():
    """A v error ``d`` becomes a velocity error ``d * (sqrt(a) + sqrt(1-a))``."""
    bridged = scheme(prediction_type="v_prediction", diff2flow=True)
    x0, noise, t = _pair_and_timesteps()
    noisy = bridged.add_noise(x0, noise, t)
    v = scheme(prediction_type="v_prediction").target(x0, noise, t)
    velocity = bridged.flow_velocity(v + 0.1, noisy, t)
    a = bridged.alphas_cumprod[t].float()
    factor = (a.sqrt() + (1 - a).sqrt()).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(velocity - (noise - x0), 0.1 * factor.expand_as(v), rtol=1e-4, atol=1e-4)


def test_diff2flow_loss_needs_the_noisy_input():
    bridged = scheme(diff2flow=True)
    x0, noise, t = _pair_and_timesteps()
    with pytest.raises(ValueError, match="noisy"):
        bridged.loss(noise, bridged.target(x0, noise, t), t)


def _unet_setup(scheduler_kwargs=None):
    from diffusers import EulerDiscreteScheduler

    from tune_models.family import LoadedModel, ModelFamily

    class UNetFamily(ModelFamily):
        name, prediction = "some-unet", "epsilon"

    family = UNetFamily()
    scheduler = EulerDiscreteScheduler(**(scheduler_kwargs or {"prediction_type": "epsilon"}))
    model = LoadedModel(family=family, flavour=None, transformer=None, vae=None, text_encoder=None, tokenizer=None,
                        scheduler=scheduler)
    return family, model


def test_scheme_for_diff2flow_keys(caplog):
    family, model = _unet_setup()
    config = _Config()
    config.diff2flow_enabled, config.diff2flow_loss = True, True
    assert ddpm.scheme_for(family, model, config).diff2flow
    # the flag alone prepares the bridge and changes nothing (SimpleTuner's semantics), with a warning
    config.diff2flow_loss = False
    with caplog.at_level("WARNING"):
        assert not ddpm.scheme_for(family, model, config).diff2flow
    assert "diff2flow_enabled alone changes nothing" in caplog.text
    config.diff2flow_enabled, config.diff2flow_loss = False, True
    with pytest.raises(ValueError, match="diff2flow_loss needs diff2flow_enabled"):
        ddpm.scheme_for(family, model, config)
    # a flow family needs no bridge: the error names the keys
    config.diff2flow_enabled = True
    with pytest.raises(ValueError, match="diff2flow_enabled / diff2flow_loss do not apply to model_family 'flowy'"):
        ddpm.scheme_for(_Flow(), None, config)
    # epsilon at zero terminal SNR has no x0 estimate at the last timestep
    family, model = _unet_setup({"prediction_type": "epsilon", "rescale_betas_zero_snr": True})
    with pytest.raises(ValueError, match="zero terminal SNR"):
        ddpm.scheme_for(family, model, config)
    config.prediction_type = "v_prediction"
    assert ddpm.scheme_for(family, model, config).diff2flow


def test_train_config_refuses_diff2flow_loss_without_the_bridge():
    from tune_train.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="diff2flow_loss needs diff2flow_enabled"):
        TrainConfig(model_family="sdxl", output_dir="out", max_train_steps=1, diff2flow_loss=True)
    assert TrainConfig(model_family="sdxl", output_dir="out", max_train_steps=1, diff2flow_enabled=True,
                       diff2flow_loss=True).diff2flow_loss


def test_timestep_bias_later_draws_the_last_quarter_two_fifths_of_the_time():
    """``later`` x2 on the last 0.25: P(last quarter) = 2 * 0.25 / (0.75 + 2 * 0.25) = 0.4."""
    s = scheme()
    s.timestep_weights = ddpm.timestep_bias_weights(1000, "later", multiplier=2.0, portion=0.25)
    drawn = s.sample_timesteps(40_000, torch.Generator().manual_seed(0))
    assert drawn.dtype == torch.int64 and drawn.min() >= 0 and drawn.max() <= 999
    share = (drawn >= 750).double().mean().item()
    assert abs(share - 0.4) < 0.01
    # the same generator state gives the same draws (resume stays exact)
    assert torch.equal(drawn, s.sample_timesteps(40_000, torch.Generator().manual_seed(0)))
    earlier = ddpm.timestep_bias_weights(1000, "earlier", multiplier=3.0, portion=0.5)
    assert earlier[:500].eq(3).all() and earlier[500:].eq(1).all()
    assert ddpm.timestep_bias_weights(1000, "none") is None


def test_timestep_bias_multiplier_zero_removes_a_range_and_refiner_range_still_holds():
    s = scheme()
    s.timestep_weights = ddpm.timestep_bias_weights(1000, "range", multiplier=0.0, begin=200, end=400)
    drawn = s.sample_timesteps(20_000, torch.Generator().manual_seed(1))
    assert not ((drawn >= 200) & (drawn < 400)).any()
    assert (drawn == 199).any() and (drawn == 400).any()
    s.max_timestep = 300  # a refiner range on top: only 0..199 are left
    assert s.sample_timesteps(4096, torch.Generator().manual_seed(1)).max() < 200
    s.max_timestep, s.min_timestep = 400, 200  # nothing left at all
    with pytest.raises(ValueError, match="timestep_bias"):
        s.sample_timesteps(1, torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"strategy": "sideways"}, "timestep_bias_strategy"),
        ({"strategy": "later", "portion": 0.0}, "timestep_bias_portion"),
        ({"strategy": "earlier", "portion": 1.5}, "timestep_bias_portion"),
        ({"strategy": "later", "multiplier": -1.0}, "timestep_bias_multiplier"),
        ({"strategy": "range", "begin": 400, "end": 200}, "timestep_bias_begin"),
        ({"strategy": "range", "begin": 0, "end": 1001}, "timestep_bias_end"),
        ({"strategy": "later", "multiplier": 0.0, "portion": 1.0}, "timestep_bias_multiplier"),
        ({"strategy": "range", "multiplier": 0.0, "begin": 0, "end": 1000}, "timestep_bias_multiplier"),
    ],
)
def test_timestep_bias_bad_values_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        ddpm.timestep_bias_weights(1000, **kwargs)


def test_scheme_for_timestep_bias_keys(caplog):
    family, model = _unet_setup()
    config = _Config()
    config.timestep_bias_strategy, config.timestep_bias_multiplier = "later", 2.0
    config.timestep_bias_portion, config.timestep_bias_begin, config.timestep_bias_end = 0.25, 0, 1000
    chosen = ddpm.scheme_for(family, model, config)
    assert chosen.timestep_weights[750:].eq(2).all() and chosen.timestep_weights[:750].eq(1).all()
    # refiner_training keeps 0..199; a bias removing exactly those is refused before training
    config.refiner_training, config.timestep_bias_strategy = True, "range"
    config.timestep_bias_multiplier, config.timestep_bias_end = 0.0, 200
    with pytest.raises(ValueError, match="timestep_bias"):
        ddpm.scheme_for(family, model, config)
    # beyond the scheduler's 1000 timesteps
    config.refiner_training, config.timestep_bias_multiplier, config.timestep_bias_end = False, 2.0, 2000
    with pytest.raises(ValueError, match="timestep_bias_end"):
        ddpm.scheme_for(family, model, config)
    # flow families: no effect, and the run says so
    with caplog.at_level("WARNING"):
        assert ddpm.scheme_for(_Flow(), None, config) is None
    assert "timestep_bias_strategy 'range' has no effect: model_family 'flowy'" in caplog.text
    assert ddpm.scheme_for(family, model, _Config()).timestep_weights is None


def test_train_config_timestep_bias_keys():
    from tune_train.config import ConfigError, TrainConfig

    def make(**kw):
        return TrainConfig(model_family="sdxl", output_dir="out", max_train_steps=1, **kw)

    assert make().timestep_bias_strategy == "none" and make().timestep_bias_multiplier == 1.0
    assert make(timestep_bias_strategy="later", timestep_bias_multiplier=0.0).timestep_bias_portion == 0.25
    for kw, key in [
        ({"timestep_bias_strategy": "sideways"}, "timestep_bias_strategy"),
        ({"timestep_bias_multiplier": -0.5}, "timestep_bias_multiplier"),
        ({"timestep_bias_portion": 0.0}, "timestep_bias_portion"),
        ({"timestep_bias_begin": -1}, "timestep_bias_begin"),
        ({"timestep_bias_strategy": "range", "timestep_bias_begin": 500, "timestep_bias_end": 500}, "timestep_bias_begin"),
        ({"timestep_bias_strategy": "later", "timestep_bias_multiplier": 0.0, "timestep_bias_portion": 1.0},
         "timestep_bias_multiplier"),
    ]:
        with pytest.raises(ConfigError, match=key):
            make(**kw)
