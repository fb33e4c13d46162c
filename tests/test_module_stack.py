"""`module_stack`: what the split path reads from the module tree and the Python call stack."""

from __future__ import annotations

import torch

from wavepass.module_stack import anchor, owner_variables, repeated_containers


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, img, txt, temb):
        self.seen = owner_variables(self.owner)  # read where the owner calls the block
        return img + self.fc(txt) + temb, txt


class Owner(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.img_in, self.txt_in = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        self.blocks = torch.nn.ModuleList(Block() for _ in range(2))
        self.small = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(1, 1)) for _ in range(2))
        for block in self.blocks:
            block.__dict__["owner"] = self  # not a submodule

    def forward(self, latent, text):
        temb = latent.mean()
        img, txt = self.img_in(latent), self.txt_in(text)
        for block in self.blocks:
            img, txt = block(img, txt, temb)
        return img


def test_owner_variables_are_its_parameters_then_its_locals_in_code_order():
    model = Owner()
    latent, text = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    model(latent, text)
    seen = model.blocks[0].seen
    assert seen[0] is latent and seen[1] is text
    assert [type(v).__name__ for v in seen[2:5]] == ["Tensor", "Tensor", "Tensor"]  # temb, img, txt
    assert seen[2].dim() == 0  # temb comes first: the split path takes the first that holds a stream


def test_outside_the_owner_there_are_no_variables():
    assert owner_variables(Owner()) == []


def test_the_anchor_is_the_repeated_container_with_the_most_parameters():
    model = Owner()
    assert [name for name, _ in repeated_containers(model)] == ["blocks", "small"]
    assert anchor(model) == "blocks"
