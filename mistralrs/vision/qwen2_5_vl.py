"""Qwen2.5-VL: Qwen2-VL's tower with RMSNorm, a gated SiLU MLP and window attention (`qwen2_vl.py` has the rest).

Window attention: each image's grid of merge blocks is cut into windows of `window_size // (patch_size * merge)`
blocks a side (smaller at the right and bottom edges). The tower reorders its tokens window by window (a merge
block's patches stay together), so every block attends inside consecutive segments: the windows, or in the
`fullatt_block_indexes` blocks the whole image (the reordering never leaves an image). The merged tokens are put
back in the processor's order at the end.
"""

from __future__ import annotations

import torch

from mistralrs.vision.qwen2_vl import Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, QwenVisionTransformer
from mistralrs.vision.registry import register_vision


def window_order(grid_thw: list[list[int]], merge: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """(`[num_merge_blocks]` the merge blocks in window order, as indices into the processor's order;
    the windows' lengths in merge blocks, in that order). `window`: the window edge in merge blocks."""
    order, lengths, offset = [], [], 0
    for t, h, w in grid_thw:
        bh, bw = h // merge, w // merge
        index = torch.arange(t * bh * bw).view(t, bh, bw)
        for frame in range(t):
            for top in range(0, bh, window):
                for left in range(0, bw, window):
                    cell = index[frame, top:top + window, left:left + window].flatten()
                    order.append(cell + offset)
                    lengths.append(cell.numel())
        offset += t * bh * bw
    return torch.cat(order), lengths


class Qwen2_5VisionTransformer(QwenVisionTransformer):
    """Qwen2.5-VL's vision tower: `forward(pixel_values, grid_thw) -> [num_patches / merge^2, out_hidden_size]`."""

    def forward(self, pixel_values: torch.Tensor, grid_thw: list[list[int]]) -> torch.Tensor:
        config = self.config
        unit = config.spatial_merge_size**2
        window = config.window_size // config.patch_size // config.spatial_merge_size
        order, window_blocks = window_order(grid_thw, config.spatial_merge_size, window)
        order = order.to(pixel_values.device)

        def reorder(x: torch.Tensor) -> torch.Tensor:
            return x.view(-1, unit, *x.shape[1:])[order].flatten(0, 1)

        hidden = reorder(self.patch_embed(pixel_values))
        cos, sin = (reorder(table) for table in self.rotary_tables(grid_thw))
        image_lens = [h * w for t, h, w in grid_thw for _ in range(t)]
        window_lens = [n * unit for n in window_blocks]
        for i, block in enumerate(self.blocks):
            hidden = block(hidden, cos, sin, image_lens if i in config.fullatt_block_indexes else window_lens)
        merged = self.merger(hidden)
        return merged[torch.argsort(order)]


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """Qwen2.5-VL: Qwen2-VL's model (Qwen2 decoder with M-RoPE, same processor and prompt) with the windowed tower.
    For still images its M-RoPE positions are Qwen2-VL's (`tokens_per_second` only spaces video frames)."""

    QWEN2_5 = True

    @classmethod
    def tower_class(cls) -> type[QwenVisionTransformer]:
        return Qwen2_5VisionTransformer


register_vision("Qwen2_5VL", ("Qwen2_5_VLForConditionalGeneration",), Qwen2_5_VLForConditionalGeneration,
                Qwen2VLImageProcessor)
