"""Tests written for mutations that tools/mutate.py found no test catching (public API only, so they
hold wherever the code lives). Keep each one fast."""
import torch

from gmem import GANMemory
from gmem.models import Discriminator, Generator


def test_saving_again_replaces_a_damaged_task_file(tmp_path):
    # mutation "store: save reuses a file without checking its hash": a file with the right name but
    # damaged content must be rewritten from the task held in memory, not kept
    torch.manual_seed(0)
    mem = GANMemory.from_base(Generator(32, 4, z_dim=8, embed_size=4), Discriminator(32, 4))
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mem.learn("a", images, iterations=1, batch_size=4, seed=0, progress=False)
    expected = mem.sample("a", 2, seed=0)
    mem.save(tmp_path)
    (task_file,) = (tmp_path / "tasks").glob("a-*.safetensors")
    data = bytearray(task_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    task_file.write_bytes(bytes(data))
    mem.save(tmp_path)
    assert torch.equal(GANMemory.load(tmp_path).sample("a", 2, seed=0), expected)
