"""BERT-style encoders: query/key/value read one input."""

from .base import Adapter


class BertAdapter(Adapter):
    name = "bert"
    model_types = ("bert", "roberta", "xlm-roberta", "electra", "camembert", "ernie", "roformer", "data2vec-text",
                   "xmod", "mpnet")
    siblings = (("query", "key", "value"), ("q", "k", "v"))
    norm_names = ("LayerNorm",)  # embeddings, attention.output and output each end in one
    mlp_names = ("intermediate",)  # up projection + activation; its down projection is `output.dense`
    attention_names = ("attention",)
