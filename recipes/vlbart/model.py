"""VL-BART (and VL-T5): a transformers encoder-decoder whose encoder also reads visual features.

Following VL-T5 / VL-Adapter (the code the DoRA paper's VL-BART runs use):

    visual token = LN(Linear(feature)) + LN(Linear([x1, y1, x2, y2, area]))      boxes are zeros for CLIP grids
                   + image-order embedding (image 0 / 1: NLVR2 has two)
                   + object-order embedding: the token embedding of <vis_extra_id_k>, k = position in its image
    encoder input  = [text embeddings (with the backbone's own positions and embedding LayerNorm); visual tokens]

The visual tokens go after the text (and its padding), get no text position and skip BART's `layernorm_embedding`
(the encoder's input dropout covers both); the attention mask is the text mask extended with ones, and the decoder
attends to the whole sequence. Grid features (B, images, 49, D) are max-pooled per image to `pool_grid` (6 x 6 for
the image tasks) inside the model, as the reference does.

Any transformers encoder-decoder works as the backbone (`AutoModelForSeq2SeqLM`): a new one is a config change.
What differs between families is one thing, found from the modules rather than a list of names: an encoder with a
`layernorm_embedding` (BART, mBART, ...) applies it, and its learned positions, to the text only; an encoder without
one (T5: relative positions, no embedding norm) takes the joint sequence as it is.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from transformers import AutoModelForSeq2SeqLM
from transformers.modeling_outputs import BaseModelOutput

from data.image_features import pool_grid

CONFIG_NAME = "vl_config.json"
VISUAL_WEIGHTS = "visual_embedding.safetensors"
BACKBONE_DIR = "backbone"
ADDED_TOKENS = "added_token_embeddings.safetensors"  # a training run's initial rows of the added tokens
N_EXTRA_IDS = 100  # VL-T5 adds <extra_id_99..0> and <vis_extra_id_99..0> to the vocabulary


def extra_tokens(n: int = N_EXTRA_IDS) -> list[str]:
    """In VL-T5's order (descending), so that <vis_extra_id_k> is the k-th row from the end of the embedding."""
    return [f"<extra_id_{i}>" for i in reversed(range(n))] + [f"<vis_extra_id_{i}>" for i in reversed(range(n))]


@dataclass
class VisualConfig:
    feat_dim: int = 2048  # CLIP RN101 grid (2048), CLIP ViT-B/32 frame embeddings (512)
    n_images: int = 2  # image-order embeddings (NLVR2 has two images)
    pos_dim: int = 5  # [x1, y1, x2, y2, area]
    pool_grid: Optional[list[int]] = field(default_factory=lambda: [6, 6])  # None: use the tokens as given
    init_std: float = 0.02


class VisualEmbedding(nn.Module):
    """Visual features -> d_model tokens. The object-order embedding is not a parameter of its own: it is the
    backbone's token embedding of <vis_extra_id_k>, passed in as the embedding module (ZeRO-3 gathers its weight
    when it is called)."""

    def __init__(self, config: VisualConfig, d_model: int):
        super().__init__()
        self.feat_embedding = nn.Sequential(nn.Linear(config.feat_dim, d_model), nn.LayerNorm(d_model))
        self.absolute_vis_pos_embedding = nn.Sequential(nn.Linear(config.pos_dim, d_model), nn.LayerNorm(d_model))
        self.img_order_embedding = nn.Embedding(config.n_images, d_model)
        self.reset_parameters(config.init_std)

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        for module in self.modules():  # as BART initialises new modules: N(0, std), zero bias, LayerNorm (1, 0)
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
            if isinstance(module, nn.Linear):
                module.bias.zero_()
            if isinstance(module, nn.LayerNorm):
                module.reset_parameters()

    def forward(self, feats: torch.Tensor, boxes: torch.Tensor, img_order: torch.Tensor, obj_order: torch.Tensor,
                token_embedding: nn.Embedding) -> torch.Tensor:
        area = (boxes[..., 3] - boxes[..., 2]) * (boxes[..., 1] - boxes[..., 0])  # VL-T5's box layout
        pos = torch.cat([boxes, area.unsqueeze(-1)], dim=-1)
        rows = token_embedding.num_embeddings - obj_order - 1  # <vis_extra_id_k> is the k-th row from the end
        obj = token_embedding(rows) / getattr(token_embedding, "embed_scale", 1.0)  # the unscaled embedding
        return (self.feat_embedding(feats.to(self.feat_embedding[0].weight.dtype)) + self.absolute_vis_pos_embedding(pos)
                + self.img_order_embedding(img_order) + obj)


class VLSeq2Seq(nn.Module):
    """A backbone encoder-decoder (`self.backbone`, unchanged transformers model) + `self.visual_embedding`."""

    def __init__(self, backbone: nn.Module, visual: VisualConfig):
        super().__init__()
        self.backbone = backbone
        self.visual_config = visual
        self.visual_embedding = VisualEmbedding(visual, backbone.config.d_model)
        self.first_added_row: Optional[int] = None  # from_backbone: the token embedding rows it drew at random
        self._visual: Optional[torch.Tensor] = None
        norm = getattr(self.backbone.get_encoder(), "layernorm_embedding", None)
        if norm is not None:
            norm.register_forward_hook(self._restore_visual_tokens)

    # ------------------------------------------------------------------------------------------- creation
    @classmethod
    def from_backbone(cls, name_or_path: str, tokenizer, visual: VisualConfig, dtype=None) -> "VLSeq2Seq":
        """A pretrained encoder-decoder (e.g. facebook/bart-base) + a fresh visual embedding. The tokenizer gets
        VL-T5's 200 extra tokens and the embedding grows to match (new rows N(0, init_std), as the reference's
        transformers initialised them, not the mean of the old rows)."""
        backbone = AutoModelForSeq2SeqLM.from_pretrained(name_or_path, **({"dtype": dtype} if dtype else {}))
        vocab = tokenizer.get_vocab()
        tokenizer.add_tokens([t for t in extra_tokens() if t not in vocab], special_tokens=True)
        first_added = backbone.get_input_embeddings().num_embeddings
        if first_added != len(tokenizer):
            backbone.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        model = cls(backbone, visual)
        if first_added < len(tokenizer):
            model.first_added_row = first_added
        return model

    def save_added_tokens(self, path: str | Path) -> None:
        """The added tokens' rows as drawn at random. They stay frozen unless a rule trains the embeddings, and the
        <vis_extra_id_k> rows are every visual token's object-order embedding: evaluation must use these very
        rows, not another draw (which changed answers from one evaluation to the next)."""
        from safetensors.torch import save_file

        if self.first_added_row is None:
            return
        rows = self.backbone.get_input_embeddings().weight[self.first_added_row:].detach().float().contiguous()
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file({"rows": rows}, str(tmp), metadata={"first_row": str(self.first_added_row)})
        os.replace(tmp, path)

    @torch.no_grad()
    def load_added_tokens(self, path: str | Path) -> None:
        """Put back the rows `save_added_tokens` wrote (the shapes must agree: the same backbone and tokens)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            rows, first = f.get_tensor("rows"), int(f.metadata()["first_row"])
        weight = self.backbone.get_input_embeddings().weight
        if first != self.first_added_row or first + rows.shape[0] != weight.shape[0] or rows.shape[1] != weight.shape[1]:
            raise ValueError(f"{path}: rows {first}..{first + rows.shape[0] - 1} of width {rows.shape[1]}, but the model "
                             f"added rows {self.first_added_row}..{weight.shape[0] - 1} of width {weight.shape[1]}")
        weight[first:] = rows.to(weight.dtype)

    def save_pretrained(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        self.backbone.save_pretrained(path / BACKBONE_DIR)
        state = {k: v.detach().contiguous() for k, v in self.visual_embedding.state_dict().items()}
        save_file(state, str(path / VISUAL_WEIGHTS))
        (path / CONFIG_NAME).write_text(json.dumps({"visual": asdict(self.visual_config)}, indent=1))
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype=None) -> "VLSeq2Seq":
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{path / CONFIG_NAME} not found: not a directory written by VLSeq2Seq.save_pretrained")
        visual = VisualConfig(**json.loads((path / CONFIG_NAME).read_text())["visual"])
        backbone = AutoModelForSeq2SeqLM.from_pretrained(path / BACKBONE_DIR, **({"dtype": dtype} if dtype else {}))
        model = cls(backbone, visual)
        model.visual_embedding.load_state_dict(load_file(str(path / VISUAL_WEIGHTS)))
        return model.to(backbone.dtype)

    @property
    def config(self):
        return self.backbone.config

    # ------------------------------------------------------------------------------------------- encoder
    def _restore_visual_tokens(self, module, inputs, output):
        # BART adds learned positions to the whole input and normalises it; the visual tokens take neither
        if self._visual is None:
            return output
        n = self._visual.shape[1]
        return torch.cat([output[:, :-n], self._visual.to(output.dtype)], dim=1)

    @contextmanager
    def _visual_tokens(self, visual: torch.Tensor):
        self._visual = visual
        try:
            yield
        finally:
            self._visual = None

    def visual_tokens(self, vis_feats: torch.Tensor, vis_boxes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, images, N, D) features (+ (B, images, N, 4) boxes, zeros if None) -> (B, images * N', d_model)."""
        if vis_feats.dim() != 4:
            raise ValueError(f"vis_feats must be (batch, images, tokens, dim), got shape {tuple(vis_feats.shape)}")
        b, n_img, _, _ = vis_feats.shape
        if n_img > self.visual_config.n_images:
            raise ValueError(f"{n_img} images per sample, the model has {self.visual_config.n_images} image orders")
        if vis_boxes is None:
            vis_boxes = vis_feats.new_zeros(*vis_feats.shape[:3], 4)
        if self.visual_config.pool_grid:
            vis_feats = pool_grid(vis_feats, self.visual_config.pool_grid)
            # pooled positions have no box of their own; VL-T5 keeps the first N' boxes (zeros for grids)
            vis_boxes = vis_boxes[:, :, : vis_feats.shape[2]]
        n_tok = vis_feats.shape[2]
        device = vis_feats.device
        img_order = torch.arange(n_img, device=device).repeat_interleave(n_tok).expand(b, -1)
        obj_order = torch.arange(n_tok, device=device).repeat(n_img).expand(b, -1)
        return self.visual_embedding(vis_feats.flatten(1, 2), vis_boxes.flatten(1, 2).to(vis_feats.dtype),
                                     img_order, obj_order, self.backbone.get_input_embeddings())

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, vis_feats: torch.Tensor,
               vis_boxes: Optional[torch.Tensor] = None) -> tuple[BaseModelOutput, torch.Tensor]:
        """Encoder outputs of [text; visual tokens] and the joint attention mask."""
        encoder = self.backbone.get_encoder()
        visual = self.visual_tokens(vis_feats, vis_boxes)
        text = encoder.embed_tokens(input_ids)
        joint = torch.cat([text, visual.to(text.dtype)], dim=1)
        mask = torch.cat([attention_mask, attention_mask.new_ones(visual.shape[:2])], dim=1)
        with self._visual_tokens(visual):
            out = encoder(inputs_embeds=joint, attention_mask=mask)
        return out, mask

    # ------------------------------------------------------------------------------------------- forward / generate
    def forward(self, input_ids, attention_mask, vis_feats, labels=None, decoder_input_ids=None, vis_boxes=None):
        """Logits (B, T, vocab) of the decoder; `labels` (-100 where ignored) give its inputs by the backbone's own
        shift (decoder start token first). The loss is left to the caller: the tasks reduce it differently."""
        encoder_outputs, mask = self.encode(input_ids, attention_mask, vis_feats, vis_boxes)
        if decoder_input_ids is None:
            decoder_input_ids = self.backbone.prepare_decoder_input_ids_from_labels(labels=labels)
        return self.backbone(encoder_outputs=encoder_outputs, attention_mask=mask,
                             decoder_input_ids=decoder_input_ids).logits

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, vis_feats, vis_boxes=None, **generate_kwargs) -> torch.Tensor:
        """transformers' generate (greedy, beam search, ...) on the joint encoder outputs."""
        encoder_outputs, mask = self.encode(input_ids, attention_mask, vis_feats, vis_boxes)
        return self.backbone.generate(encoder_outputs=encoder_outputs, attention_mask=mask, **generate_kwargs)

    @torch.no_grad()
    def choose(self, input_ids, attention_mask, vis_feats, candidates: torch.Tensor, vis_boxes=None) -> torch.Tensor:
        """Index of the most likely candidate answer per sample, from the logits at the first position where the
        candidates' target ids differ (NLVR2: "true" vs "false" after the decoder start and BOS, as the reference
        scores it, without free generation). `candidates`: (C, L) target ids of each answer."""
        differ = (candidates != candidates[:1]).any(dim=0).nonzero()
        if len(differ) == 0:
            raise ValueError("the candidate answers have identical token ids")
        pos = int(differ[0])
        prefix = candidates[:1, : pos + 1].expand(input_ids.shape[0], -1)
        logits = self.forward(input_ids, attention_mask, vis_feats, labels=prefix, vis_boxes=vis_boxes)
        return logits[:, pos, candidates[:, pos]].argmax(dim=-1)
