"""A model family's configuration (gpt-fast's ``ModelArgs``) and the construction every
model shares."""
import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from . import common, condition


@dataclass(kw_only=True)
class Config:
    """Base of a model family's config dataclass (gpt-fast's ``ModelArgs``), holding the
    arguments every model has: a family adds its own, each with its default, and named
    ``PRESETS`` of some. ``dataclasses.asdict(config)`` is what a checkpoint's
    ``config.json`` stores."""
    PRESETS: ClassVar[dict] = {}
    vocab_size: int = 16384
    num_classes: int = 1000
    grid_size: int = 16
    dim: int = 1024
    n_head: int = 16
    n_kv_head: int | None = None
    multiple_of: int = 256
    class_dropout: float = 0.1
    dropout: float = 0.1
    cond_dim: int | None = None

    @classmethod
    def from_preset(cls, name, **overrides):
        """The preset ``name`` with ``overrides`` (other fields keep their defaults)."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {list(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})


class Configured:
    """A model of one family, built from its ``config_class``: ``Model(config)``,
    ``Model(**fields)`` (how checkpoints store it) or ``Model(config, **fields)`` (the fields
    replace the config's); an unknown field is a TypeError."""
    config_class = Config

    @classmethod
    def from_preset(cls, name, **overrides):
        """``from_preset("L", vocab_size=16384)``: the model of :meth:`Config.from_preset`."""
        return cls(cls.config_class.from_preset(name, **overrides))

    def _configure(self, config, fields):
        """Sets ``self.config`` and what every model has first: the sizes, the token and
        class embeddings (in this order: the training RNG stream depends on it)."""
        config = self._set_config(config, fields)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.cls_embedding = condition.embedding(config.num_classes, config.dim,
                                                 config.cond_dim)
        return config

    def _set_config(self, config, fields):
        """Sets ``self.config`` (``config`` with ``fields`` on top) and the sizes."""
        if config is None:
            config = self.config_class(**fields)
        elif type(config) is not self.config_class:
            raise TypeError(f"config must be a {self.config_class.__name__}, got "
                            f"{type(config).__name__}")
        else:
            config = dataclasses.replace(config, **fields)
        self.config = config
        self.vocab_size, self.num_classes = config.vocab_size, config.num_classes
        self.grid_size, self.n_tokens = config.grid_size, config.grid_size ** 2
        self.n_head = config.n_head
        return config

    def _head(self):
        """The final norm and the output projection."""
        self.norm = nn.RMSNorm(self.config.dim, eps=1e-5)
        self.output = nn.Linear(self.config.dim, self.vocab_size, bias=False)

    def _init(self):
        common.init_weights(self)
        nn.init.zeros_(self.output.weight)  # LlamaGen starts from uniform predictions
