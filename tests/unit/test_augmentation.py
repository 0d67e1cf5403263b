import pytest
import torch

from modeling.augmentation import (
    AUGMENTATION_PRESETS,
    available_augmentations,
    build_augmentation,
    create_augmentation,
    resolve_augmentation_names,
)

FACTORY_FLOOR = {"brightness_contrast", "color_temperature", "specular_highlight", "blur", "occlusion"}
GENERIC = {"hflip", "vflip", "rotate90", "rotation", "resized_crop", "zoom", "rescale"}


@pytest.fixture
def textured_image() -> torch.Tensor:
    # Asymmetric, non-uniform content so that every flip, turn, blur and colour change is visible.
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(3, 48, 48, generator=generator) * 0.6 + 0.2
    image[:, :10, :20] = 0.9
    return image


def test_every_required_augmentation_is_registered():
    assert GENERIC | FACTORY_FLOOR <= set(available_augmentations())


@pytest.mark.parametrize("name", sorted(GENERIC | FACTORY_FLOOR))
def test_each_augmentation_changes_the_image_and_keeps_its_shape(name, textured_image):
    torch.manual_seed(1)
    transform = create_augmentation(name, image_size=48)
    changed = transform(textured_image.clone())
    assert changed.shape == textured_image.shape
    assert changed.dtype == textured_image.dtype
    assert float(changed.min()) >= 0.0 and float(changed.max()) <= 1.0
    assert not torch.allclose(changed, textured_image, atol=1e-4), f"{name} left the image unchanged"


def test_pipeline_is_switchable_and_none_is_identity(textured_image):
    identity = build_augmentation("none", image_size=48)
    assert torch.equal(identity(textured_image), textured_image)
    torch.manual_seed(0)
    always = build_augmentation(["hflip"], image_size=48, probability=1.0)
    assert torch.equal(always(textured_image), torch.flip(textured_image, dims=(-1,)))
    never = build_augmentation(["hflip", "blur"], image_size=48, probability=0.0)
    assert torch.equal(never(textured_image), textured_image)


def test_presets_and_comma_lists_resolve_and_unknown_names_are_refused():
    assert resolve_augmentation_names("factory") == list(AUGMENTATION_PRESETS["factory"])
    assert resolve_augmentation_names("hflip, blur") == ["hflip", "blur"]
    assert resolve_augmentation_names(None) == [] and resolve_augmentation_names(False) == []
    with pytest.raises(ValueError, match="unknown augmentation 'sparkle'"):
        resolve_augmentation_names("hflip,sparkle")


def test_factory_pipeline_keeps_shape_over_many_draws(textured_image):
    pipeline = build_augmentation("all", image_size=48)
    torch.manual_seed(3)
    outputs = [pipeline(textured_image) for _ in range(20)]
    assert all(output.shape == textured_image.shape for output in outputs)
    # Random: not every draw is the same.
    assert len({round(float(output.sum()), 3) for output in outputs}) > 1


def test_rotation_keeps_the_orientation_and_rotate90_turns(textured_image):
    # The bright block sits top-left: a small angle keeps it there, a quarter turn moves it to another corner.
    def corner_of_block(image: torch.Tensor) -> tuple[int, int]:
        grey = image.mean(0)
        half = grey.shape[-1] // 2
        quadrants = {(r, c): float(grey[r * half:(r + 1) * half, c * half:(c + 1) * half].mean()) for r in (0, 1) for c in (0, 1)}
        return max(quadrants, key=quadrants.get)

    torch.manual_seed(0)
    rotation, quarter = create_augmentation("rotation", image_size=48), create_augmentation("rotate90", image_size=48)
    assert {corner_of_block(rotation(textured_image)) for _ in range(30)} == {(0, 0)}
    assert {corner_of_block(quarter(textured_image)) for _ in range(30)} == {(0, 1), (1, 1), (1, 0)}


def test_zooming_out_leaves_no_black_border(textured_image):
    from modeling.augmentation import RandomZoom

    torch.manual_seed(0)
    for _ in range(10):
        zoomed_out = RandomZoom(min_scale=0.8, max_scale=0.85)(textured_image)
        assert zoomed_out.shape == textured_image.shape
        # every pixel of the source is >= 0.2: a filled border would show as values near 0 along the edges
        assert float(zoomed_out[:, :3, :].min()) > 0.15 and float(zoomed_out[:, :, -3:].min()) > 0.15
