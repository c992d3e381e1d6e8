"""The demo's MAE pre-training: learns (held-out loss drops) and writes an official-layout checkpoint."""
import torch

from hgkd.data.sources import open_source
from hgkd.data.demo_data import write_digits_shards
from hgkd.extract.teachers import create_teacher
from hgkd.extract.teachers.base import TEACHERS, load_checkpoint_file
from hgkd.extract.teachers.mae_pretrain import MaeDecoder, mae_loss, pretrain_mae, random_masks
from hgkd.data.views import decode_image


def heldout_loss(teacher, decoder, images) -> float:
    mean = torch.tensor(teacher.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(teacher.std).view(1, 3, 1, 1) * 255
    masks = random_masks(len(images), teacher.num_patches, 0.5, torch.Generator().manual_seed(7))
    with torch.no_grad():
        return mae_loss(teacher, decoder, (images.float() - mean) / std, masks).item()


def test_mae_pretraining_learns_and_loads_as_a_teacher(tmp_path):
    train, test = write_digits_shards(tmp_path / "d", img_size=32, max_images=400)
    images = {name: torch.stack([decode_image(s.data) for s in open_source([pattern])])
              for name, pattern in (("train", train), ("test", test))}
    ckpt = pretrain_mae("mae_vit_tiny_patch16", images["train"], tmp_path / "mae.pth", epochs=15, mask_ratio=0.5)
    state = load_checkpoint_file(ckpt)
    assert any(k.startswith("decoder_") for k in state) and "mask_token" in state  # official MAE layout
    teacher = create_teacher("mae_vit_tiny_patch16", checkpoint=str(ckpt), img_size=32)  # filter drops decoder
    trained = TEACHERS.get("mae_vit_tiny_patch16")(img_size=32)
    trained.load_state_dict({k: v for k, v in state.items() if k in trained.state_dict()})
    decoder = MaeDecoder(trained)
    decoder.load_state_dict({k: v for k, v in state.items() if k in decoder.state_dict()})
    torch.manual_seed(0)
    random_teacher = TEACHERS.get("mae_vit_tiny_patch16")(img_size=32)
    random_decoder = MaeDecoder(random_teacher)
    assert heldout_loss(trained.eval(), decoder.eval(), images["test"]) < 0.8 * heldout_loss(
        random_teacher.eval(), random_decoder.eval(), images["test"])
    torch.testing.assert_close(teacher.state_dict()["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])
