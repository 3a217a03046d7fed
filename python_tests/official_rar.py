"""A transcription, for parity tests only, of the official RAR generator and its MaskGIT
VQGAN tokenizer (bytedance/1d-tokenizer, Apache-2.0): ``modeling/rar.py`` (Attention with
its torch.cat KV cache, Block, FinalLayer, RAR.forward_fn and RAR.generate) and
``modeling/modules/maskgit_vqgan.py`` with ``PretrainedTokenizer`` of ``modeling/titok.py``.

Kept as the official code computes, quirks included (the dense causal mask, the per-step
re-embedding of the whole sequence, the residual 1x1 conv applied to the block's output);
only the configuration objects are replaced by arguments, timm's ``Mlp`` by the layers it
builds, and ``generate``'s ``torch.multinomial`` by an argmax ("made greedy"). Nothing here
imports sarkernels: the tests compare our models against it.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


def build_causal_mask(seq_length):
    mask = torch.empty(seq_length, seq_length)
    mask.fill_(float("-inf"))
    mask.triu_(1)
    return mask


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)
        self.kv_cache = False
        self.k_cache = None
        self.v_cache = None

    def reset_kv_cache(self):
        self.k_cache = None
        self.v_cache = None

    def forward(self, x, attn_mask=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.kv_cache:
            if self.k_cache is None and self.v_cache is None:
                k_cache, v_cache = k, v
            else:
                assert N in [1, 2], f"x.shape {x.shape}"
                k_cache = torch.cat([self.k_cache, k], dim=-2)
                v_cache = torch.cat([self.v_cache, v], dim=-2)
            self.k_cache, self.v_cache = k_cache, v_cache
            k, v = k_cache, v_cache
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class FinalLayer(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        scale, shift = self.adaLN_modulation(c).chunk(2, dim=-1)
        return modulate(self.norm_final(x), shift, scale)


class Mlp(nn.Module):  # timm.layers.Mlp(in, hidden, act_layer=nn.GELU, drop=0)
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, bias=True))

    def forward(self, x, attn_mask=None, c=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), attn_mask=attn_mask)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class RAR(nn.Module):
    def __init__(self, embed_dim, depth, num_heads, intermediate_size, image_seq_len,
                 codebook_size, num_classes):
        super().__init__()
        mlp_ratio = intermediate_size / embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.embeddings = nn.Embedding(codebook_size + 1 + num_classes + 1, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, image_seq_len + 1024, embed_dim))
        self.target_aware_pos_embed = nn.Parameter(torch.zeros(1, image_seq_len + 1024, embed_dim))
        self.timesteps_embeddings = nn.Parameter(torch.zeros(1, image_seq_len + 100, embed_dim))
        self.adaln_before_head = FinalLayer(embed_dim)
        self.lm_head = nn.Linear(embed_dim, codebook_size, bias=True)
        self.condition_num_classes = num_classes
        self.image_seq_len = image_seq_len
        self.target_codebook_size = codebook_size
        self.none_condition_id = num_classes + codebook_size + 1
        self.register_buffer("attn_mask", build_causal_mask(image_seq_len + 1024), persistent=False)

    def enable_kv_cache(self):
        for block in self.blocks:
            block.attn.kv_cache = True
            block.attn.reset_kv_cache()

    def disable_kv_cache(self):
        for block in self.blocks:
            block.attn.kv_cache = False
            block.attn.reset_kv_cache()

    def get_raster_orders(self, x):
        return torch.stack([torch.arange(self.image_seq_len, device=x.device) for _ in range(x.shape[0])])

    def shuffle(self, x, orders):
        batch_size, seq_len = x.shape[:2]
        batch_indices = torch.arange(batch_size).unsqueeze(1).expand(-1, seq_len)
        return x[batch_indices, orders]

    def preprocess_condition(self, condition):
        return condition + self.target_codebook_size + 1

    def get_none_condition(self, condition):
        return torch.full_like(condition, self.none_condition_id)

    def forward_fn(self, input_ids, condition, orders=None, is_sampling=False):
        if orders is None:
            orders = self.get_raster_orders(input_ids)
        input_ids = torch.cat([condition.view(condition.shape[0], -1),
                               input_ids.view(input_ids.shape[0], -1)], dim=1)
        embeddings = self.embeddings(input_ids)
        condition_token = embeddings[:, 0]
        pos_embed = self.pos_embed.repeat(input_ids.shape[0], 1, 1)
        prefix = 2
        pos_embed_prefix = pos_embed[:, :prefix]
        pos_embed_postfix = self.shuffle(pos_embed[:, prefix:prefix + self.image_seq_len], orders)
        target_aware_pos_embed = self.target_aware_pos_embed.repeat(input_ids.shape[0], 1, 1)
        target_aware_pos_embed_postfix = self.shuffle(
            target_aware_pos_embed[:, prefix:prefix + self.image_seq_len], orders)
        if not is_sampling:
            embeddings = torch.cat([embeddings[:, :1], self.shuffle(embeddings[:, 1:], orders)], dim=1)
        x = embeddings
        cls_tokens = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls_tokens, x), dim=1)
        x = x + torch.cat([pos_embed_prefix, pos_embed_postfix], dim=1)[:, :x.shape[1]]
        target_aware_pos_embed = torch.cat(
            [torch.zeros_like(x[:, :prefix - 1]), target_aware_pos_embed_postfix,
             torch.zeros_like(x[:, -1:])], dim=1)
        x = x + target_aware_pos_embed[:, :x.shape[1]]
        attn_mask = self.attn_mask[:x.shape[1], :x.shape[1]]
        condition_token = condition_token.unsqueeze(1) + self.timesteps_embeddings[:, :x.shape[1]]
        if self.blocks[0].attn.kv_cache:
            if self.blocks[0].attn.k_cache is not None and self.blocks[0].attn.v_cache is not None:
                x = x[:, -1:]
                attn_mask = None
                condition_token = condition_token[:, -1:]
        for blk in self.blocks:
            x = blk(x, attn_mask=attn_mask, c=condition_token)
        if not self.blocks[0].attn.kv_cache:
            x = x[:, prefix - 1:]
            condition_token = condition_token[:, prefix - 1:]
        x = self.adaln_before_head(x, condition_token)
        return self.lm_head(x)

    @torch.no_grad()
    def generate(self, condition, guidance_scale, randomize_temperature, guidance_scale_pow,
                 kv_cache=True):
        condition = self.preprocess_condition(condition)
        device = condition.device
        num_samples = condition.shape[0]
        ids = torch.full((num_samples, 0), -1, device=device)
        if kv_cache:
            self.enable_kv_cache()
        for step in range(self.image_seq_len):
            scale_pow = torch.ones((1), device=device) * guidance_scale_pow
            scale_step = (1 - torch.cos(((step / self.image_seq_len) ** scale_pow) * torch.pi)) * 1 / 2
            cfg_scale = (guidance_scale - 1) * scale_step + 1
            if guidance_scale != 0:
                logits = self.forward_fn(torch.cat([ids, ids], dim=0),
                                         torch.cat([condition, self.get_none_condition(condition)], dim=0),
                                         is_sampling=True)
                cond_logits, uncond_logits = logits[:num_samples], logits[num_samples:]
                logits = uncond_logits + (cond_logits - uncond_logits) * cfg_scale
            else:
                logits = self.forward_fn(ids, condition, is_sampling=True)
            logits = logits[:, -1]
            logits = logits / randomize_temperature
            sampled = logits.argmax(-1, keepdim=True)  # made greedy: torch.multinomial in the official
            ids = torch.cat((ids, sampled), dim=-1)
        self.disable_kv_cache()
        return ids


# ---- modeling/modules/maskgit_vqgan.py and titok.PretrainedTokenizer ----

class Conv2dSame(nn.Conv2d):
    def calc_same_pad(self, i, k, s, d):
        return max((math.ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)

    def forward(self, x):
        ih, iw = x.size()[-2:]
        pad_h = self.calc_same_pad(i=ih, k=self.kernel_size[0], s=self.stride[0], d=self.dilation[0])
        pad_w = self.calc_same_pad(i=iw, k=self.kernel_size[1], s=self.stride[1], d=self.dilation[1])
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return super().forward(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels=None):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels_ = in_channels if out_channels is None else out_channels
        self.norm1 = nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)
        self.conv1 = Conv2dSame(in_channels, self.out_channels_, kernel_size=3, bias=False)
        self.norm2 = nn.GroupNorm(num_groups=32, num_channels=self.out_channels_, eps=1e-6, affine=True)
        self.conv2 = Conv2dSame(self.out_channels_, self.out_channels_, kernel_size=3, bias=False)
        if self.in_channels != self.out_channels_:
            self.nin_shortcut = Conv2dSame(self.out_channels_, self.out_channels_, kernel_size=1, bias=False)

    def forward(self, hidden_states):
        residual = hidden_states
        hidden_states = self.conv1(F.silu(self.norm1(hidden_states)))
        hidden_states = self.conv2(F.silu(self.norm2(hidden_states)))
        if self.in_channels != self.out_channels_:
            residual = self.nin_shortcut(hidden_states)
        return hidden_states + residual


class DownsamplingBlock(nn.Module):
    def __init__(self, ch, channel_mult, num_res_blocks, block_idx):
        super().__init__()
        in_channel_mult = (1,) + tuple(channel_mult)
        block_in = ch * in_channel_mult[block_idx]
        block_out = ch * channel_mult[block_idx]
        res_blocks = nn.ModuleList()
        for _ in range(num_res_blocks):
            res_blocks.append(ResnetBlock(block_in, block_out))
            block_in = block_out
        self.block = res_blocks
        self.downsample = block_idx != len(channel_mult) - 1

    def forward(self, hidden_states):
        for res_block in self.block:
            hidden_states = res_block(hidden_states)
        if self.downsample:
            hidden_states = F.avg_pool2d(hidden_states, kernel_size=2, stride=2)
        return hidden_states


class UpsamplingBlock(nn.Module):
    def __init__(self, ch, channel_mult, num_res_blocks, block_idx):
        super().__init__()
        if block_idx == len(channel_mult) - 1:
            block_in = ch * channel_mult[-1]
        else:
            block_in = ch * channel_mult[block_idx + 1]
        block_out = ch * channel_mult[block_idx]
        res_blocks = []
        for _ in range(num_res_blocks):
            res_blocks.append(ResnetBlock(block_in, block_out))
            block_in = block_out
        self.block = nn.ModuleList(res_blocks)
        self.add_upsample = block_idx != 0
        if self.add_upsample:
            self.upsample_conv = Conv2dSame(block_out, block_out, kernel_size=3)

    def forward(self, hidden_states):
        for res_block in self.block:
            hidden_states = res_block(hidden_states)
        if self.add_upsample:
            hidden_states = F.interpolate(hidden_states, scale_factor=2.0, mode="nearest")
            hidden_states = self.upsample_conv(hidden_states)
        return hidden_states


class Encoder(nn.Module):
    def __init__(self, ch, channel_mult, num_res_blocks, z_channels):
        super().__init__()
        self.conv_in = Conv2dSame(3, ch, kernel_size=3, bias=False)
        self.down = nn.ModuleList([DownsamplingBlock(ch, channel_mult, num_res_blocks, i)
                                   for i in range(len(channel_mult))])
        mid_channels = ch * channel_mult[-1]
        self.mid = nn.ModuleList([ResnetBlock(mid_channels, mid_channels) for _ in range(num_res_blocks)])
        self.norm_out = nn.GroupNorm(num_groups=32, num_channels=mid_channels, eps=1e-6, affine=True)
        self.conv_out = Conv2dSame(mid_channels, z_channels, kernel_size=1)

    def forward(self, pixel_values):
        hidden_states = self.conv_in(pixel_values)
        for block in self.down:
            hidden_states = block(hidden_states)
        for block in self.mid:
            hidden_states = block(hidden_states)
        return self.conv_out(F.silu(self.norm_out(hidden_states)))


class Decoder(nn.Module):
    def __init__(self, ch, channel_mult, num_res_blocks, z_channels):
        super().__init__()
        block_in = ch * channel_mult[-1]
        self.conv_in = Conv2dSame(z_channels, block_in, kernel_size=3)
        self.mid = nn.ModuleList([ResnetBlock(block_in, block_in) for _ in range(num_res_blocks)])
        upsample_blocks = [UpsamplingBlock(ch, channel_mult, num_res_blocks, i)
                           for i in reversed(range(len(channel_mult)))]
        self.up = nn.ModuleList(list(reversed(upsample_blocks)))
        block_out = ch * channel_mult[0]
        self.norm_out = nn.GroupNorm(num_groups=32, num_channels=block_out, eps=1e-6, affine=True)
        self.conv_out = Conv2dSame(block_out, 3, kernel_size=3)

    def forward(self, hidden_states):
        hidden_states = self.conv_in(hidden_states)
        for block in self.mid:
            hidden_states = block(hidden_states)
        for block in reversed(self.up):
            hidden_states = block(hidden_states)
        return self.conv_out(F.silu(self.norm_out(hidden_states)))


class VectorQuantizer(nn.Module):
    def __init__(self, num_embeddings, embedding_dim):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.embedding = nn.Embedding(num_embeddings, embedding_dim)

    def compute_distances(self, hidden_states):
        hidden_states_flattended = hidden_states.reshape((-1, self.embedding_dim))
        emb_weights = self.embedding.weight.t()
        inputs_norm_sq = hidden_states_flattended.pow(2.0).sum(dim=1, keepdim=True)
        codebook_t_norm_sq = emb_weights.pow(2.0).sum(dim=0, keepdim=True)
        return torch.addmm(inputs_norm_sq + codebook_t_norm_sq, hidden_states_flattended,
                           emb_weights, alpha=-2.0)

    def get_code(self, hidden_states):  # the indices forward() returns, without z_q and the loss
        hidden_states = hidden_states.permute(0, 2, 3, 1).contiguous()
        indices = torch.argmin(self.compute_distances(hidden_states), axis=1).unsqueeze(1)
        return indices.reshape(hidden_states.shape[0], -1)

    def get_codebook_entry(self, indices):
        batch, num_tokens = indices.shape
        z_q = self.embedding(indices)
        side = int(math.sqrt(num_tokens))
        return z_q.reshape(batch, side, side, -1).permute(0, 3, 1, 2)


class PretrainedTokenizer(nn.Module):
    """MaskGIT's VQGAN as ``titok.PretrainedTokenizer`` holds it (the official file's keys);
    the official sizes are ch 128, channel_mult (1, 1, 2, 2, 4), 2 res blocks, z 256, 1024 codes."""

    def __init__(self, ch=128, channel_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256,
                 num_embeddings=1024):
        super().__init__()
        self.encoder = Encoder(ch, channel_mult, num_res_blocks, z_channels)
        self.decoder = Decoder(ch, channel_mult, num_res_blocks, z_channels)
        self.quantize = VectorQuantizer(num_embeddings, z_channels)

    @torch.no_grad()
    def encode(self, x):
        return self.quantize.get_code(self.encoder(x))

    @torch.no_grad()
    def decode(self, codes):
        return torch.clamp(self.decoder(self.quantize.get_codebook_entry(codes)), 0.0, 1.0)
