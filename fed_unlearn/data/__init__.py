"""Question/answer data: synthetic TOFU-shaped people, JSONL loading, encoding."""

from fed_unlearn.data.jsonl import (
    DataFormatError,
    load_data_dir,
    load_jsonl,
    write_jsonl,
)
from fed_unlearn.data.qa import collate, encode_qa
from fed_unlearn.data.synthetic import Person, TofuData, generate_people, generate_tofu
from fed_unlearn.types import QAItem

__all__ = [
    "DataFormatError",
    "Person",
    "QAItem",
    "TofuData",
    "collate",
    "encode_qa",
    "generate_people",
    "generate_tofu",
    "load_data_dir",
    "load_jsonl",
    "write_jsonl",
]
