"""A GGUF file as a Hugging Face folder, one tensor at a time: what block-by-block quantization (:mod:`dgq.stream`)
reads when it is given a ``.gguf`` file or an alias.

transformers' own GGUF loader (``from_pretrained(gguf_file=...)``) dequantizes the whole model into memory. Here
the same steps run per tensor, with transformers' own pieces, so the folder holds exactly (bitwise) the tensors that
loader gives in float32 and ``save_pretrained`` writes:

- the config from the metadata as ``load_gguf_checkpoint(..., return_tensors=False)`` parses it (no tensor data
  read), built as ``AutoConfig.from_pretrained(gguf_file=...)`` builds it, with ``dtype`` float32 and
  ``architectures`` as ``save_pretrained`` sets them; the tokenizer (with its chat template) from
  ``AutoTokenizer.from_pretrained(gguf_file=...)``;
- the names from ``get_gguf_hf_weights_map`` on a skeleton of the model on the ``meta`` device (no memory);
- the tensor table from ``gguf.GGUFReader`` (which is then let go: it holds every metadata value as Python and
  numpy objects, the whole vocabulary included); each tensor's bytes read from the file when its turn comes,
  dequantized by ``gguf.quants.dequantize`` (in chunks of rows: bounded temporaries, the same values), passed
  through the architecture's tensor processor (``TENSOR_PROCESSORS``: for llama, the reverse of llama.cpp's q/k
  row permutation), cast to float32 and handed to the writer;
- tied embeddings as transformers ties them: a GGUF without ``output.weight`` gives ``tie_word_embeddings`` and no
  ``lm_head.weight`` in the files.

The folder is written by :class:`dgq.checkpoint.CheckpointWriter` in shards of at most ``max_shard_size``
(``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``, or one ``model.safetensors``) into a
temporary folder renamed into place when complete (:func:`dgq.fsutil.atomic_folder`); a shard is written before a
tensor it has no room for is read. Peak host memory: the larger of the shard being assembled and the largest tensor
in float32 (twice for llama's permuted q/k) + the tokenizer + the Python/torch/transformers baseline, or, while the
metadata is parsed (gguf's reader and transformers' loader each parse all of it), the parsed vocabulary: most of
the peak for a small model with a large vocabulary (``benchmarks/gguf_stream.py``). The folder takes 4 bytes per
weight on disk (32/4.5 ≈ 7 times a 4-bit GGUF); the free disk is checked first.

Refused with one line, with nothing left at the target: a file that is not a GGUF (:func:`check_gguf_header`), a
truncated or corrupt one, an architecture dgq does not quantize, a tensor type gguf cannot dequantize, a tensor
transformers' loader would merge with others (MoE experts: they need the whole model), weights that do not cover the
model's parameters.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from .arch import arch_for_config
from .checkpoint import DEFAULT_STREAM_SHARD, CheckpointWriter, _first_line
from .errors import DGQError
from .fsutil import atomic_folder, check_disk

log = logging.getLogger("dgq")


def check_gguf_header(path: Path) -> None:
    """A GGUF file starts with the magic ``GGUF``; anything else (a wrong file, parts concatenated out of order)
    is refused before the reader sees it."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise DGQError(f"cannot read {path}: {e.strerror}") from None
    if magic != b"GGUF":
        raise DGQError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); if it was assembled from "
                       f"parts, they were joined in the wrong order or one is missing")


CHUNK_ELEMENTS = 1 << 24  # weights dequantized at once (64 MB of float32): bounds gguf's temporaries


class TensorInfo(NamedTuple):
    """One tensor of the file: where its bytes are and how the reader would see them."""

    name: str
    qtype: object  # gguf.GGMLQuantizationType
    offset: int  # from the start of the file
    nbytes: int
    dtype: np.dtype  # of the reader's view of the bytes (uint8 for blocks)
    shape: tuple[int, ...]  # of the reader's view (rows of blocks for block types)
    n_elements: int


def read_gguf(path: Path) -> tuple[list[TensorInfo], str]:
    """The tensor table and the architecture of the GGUF file ``path``, from ``gguf.GGUFReader`` (no tensor data is
    read; the reader, which holds every metadata value, vocabulary included, is let go), or a one-line error."""
    import gguf

    check_gguf_header(path)
    try:
        reader = gguf.GGUFReader(path)
        infos = [TensorInfo(t.name, t.tensor_type, t.data_offset, t.n_bytes, t.data.dtype, tuple(t.data.shape),
                            int(t.n_elements)) for t in reader.tensors]
        architecture = reader.fields["general.architecture"].contents()
    except Exception as e:  # noqa: BLE001 - the reader fails with struct.error, ValueError, ... on bad files
        raise DGQError(f"cannot load GGUF {path} (truncated or corrupt?): {type(e).__name__}: {_first_line(e)}") \
            from None
    return infos, architecture


def check_tensor_types(path: Path, infos: list[TensorInfo]) -> None:
    """Every tensor's type is one ``gguf.quants.dequantize`` handles (probed on one zero block of the type)."""
    import gguf

    seen = {}
    for t in infos:
        qtype = t.qtype
        if qtype not in seen:
            block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
            try:
                gguf.quants.dequantize(np.zeros((1, nbytes), dtype=np.uint8), qtype)
                seen[qtype] = True
            except NotImplementedError:
                seen[qtype] = False
        if not seen[qtype]:
            raise DGQError(f"GGUF {path}: tensor {t.name} is of type {qtype.name}, which gguf cannot dequantize")


def dequantize(f, path: Path, t: TensorInfo) -> np.ndarray:
    """Tensor ``t`` read from the open file ``f`` and dequantized by ``gguf.quants.dequantize``, in chunks of whole
    rows (blocks never straddle rows) of about :data:`CHUNK_ELEMENTS` weights into one float32 array: the same
    values as dequantizing it at once, with bounded temporaries."""
    import gguf

    raw = np.empty(t.nbytes, dtype=np.uint8)
    f.seek(t.offset)
    if f.readinto(raw) != t.nbytes:
        raise DGQError(f"GGUF {path}: tensor {t.name} ends past the end of the file (truncated or corrupt?)")
    raw = raw.view(t.dtype).reshape(t.shape)
    try:
        if raw.ndim < 2 or t.n_elements <= CHUNK_ELEMENTS:
            return gguf.quants.dequantize(raw, t.qtype)
        rows = raw.reshape(-1, raw.shape[-1])
        cols = t.n_elements // rows.shape[0]
        out = np.empty((rows.shape[0], cols), dtype=np.float32)
        step = max(1, CHUNK_ELEMENTS // cols)
        for i in range(0, rows.shape[0], step):
            out[i:i + step] = gguf.quants.dequantize(rows[i:i + step], t.qtype).reshape(-1, cols)
    except Exception as e:  # noqa: BLE001 - bad sizes and the like
        raise DGQError(f"GGUF {path}: cannot dequantize tensor {t.name} (corrupt?): {type(e).__name__}: "
                       f"{_first_line(e)}") from None
    return out.reshape(*raw.shape[:-1], cols)


def _config_of(path: Path, parsed: dict):
    """The model config from the GGUF metadata as ``load_gguf_checkpoint`` parsed it: what
    ``AutoConfig.from_pretrained(gguf_file=...)`` builds (``from_dict`` of the model type's config class)."""
    from transformers import CONFIG_MAPPING

    d = dict(parsed["config"])
    try:
        return CONFIG_MAPPING[d["model_type"]].from_dict(d)
    except Exception as e:  # noqa: BLE001 - unknown model types, bad values... surface as many types
        raise DGQError(f"cannot read the config of GGUF {path}: {type(e).__name__}: {_first_line(e)}") from None


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - a missing or odd vocabulary fails in many ways
        raise DGQError(f"cannot read the tokenizer of GGUF {path}: {type(e).__name__}: {_first_line(e)}") from None


class GGUFSource:
    """A GGUF file's config, tokenizer, model skeleton (meta device) and tensors, the latter one at a time as
    transformers' GGUF loader produces them (see the module docstring)."""

    def __init__(self, path: Path):
        from transformers import AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            load_gguf_checkpoint,
        )

        self.path = Path(path)
        self.infos, architecture = read_gguf(self.path)
        check_tensor_types(self.path, self.infos)
        try:  # the metadata as transformers' loader parses it (no tensor data is read)
            parsed = load_gguf_checkpoint(str(self.path), return_tensors=False)
        except Exception as e:  # noqa: BLE001 - unsupported architectures, missing keys... surface as many types
            raise DGQError(f"cannot read GGUF {self.path}: {type(e).__name__}: {_first_line(e)}") from None
        self.parsed = {"config": parsed["config"]}  # not the vocabulary: the tokenizer is read on its own
        self.config = _config_of(self.path, self.parsed)
        arch_for_config(self.config)  # architectures dgq does not quantize: refused before any work
        self.processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=self.parsed["config"])
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=torch.float32)
        self.names = get_gguf_hf_weights_map(self.model, self.processor)  # GGUF name -> HF name
        # what the files must hold: the parameters (a tied lm_head once, as the embeddings) and persistent buffers
        self.expected = {n for n, _ in self.model.named_parameters()}
        self.expected |= {n for n, _ in self.model.named_buffers() if n in self.model.state_dict()}

    def float32_bytes(self) -> int:
        """Bytes of the folder's weights (float32)."""
        return sum(4 * t.n_elements for t in self.infos if t.name in self.names)

    def tensors(self, progress: bool | None = None, before=None):
        """``(hf_name, float32 tensor)`` in the file's order, one at a time; checks that they cover the model.
        ``before(nbytes)`` is called before each tensor is read (with its float32 size)."""
        written = set()
        parsed = {**self.parsed, "tensors": {}}  # where a processor that merges tensors (MoE) would put them
        with open(self.path, "rb") as f:
            for t in tqdm(self.infos, desc="GGUF -> folder", disable=None if progress is None else not progress):
                if before is not None:
                    before(4 * t.n_elements)
                w = dequantize(f, self.path, t)
                result = self.processor.process(weights=w, name=t.name, tensor_key_mapping=self.names,
                                                parsed_parameters=parsed)
                if result.name is None or parsed["tensors"]:
                    raise DGQError(f"GGUF {self.path}: tensor {t.name} is merged with others by transformers' "
                                   f"loader (experts); only the whole model in memory can convert it")
                if result.name not in self.names:
                    continue  # as transformers: tensors the model has no place for (e.g. rope_freqs) are skipped
                name = self.names[result.name]
                if name not in self.expected or name in written:
                    raise DGQError(f"GGUF {self.path}: tensor {t.name} maps to {name}, which the model "
                                   + ("ties to another tensor" if name not in self.expected else "already has"))
                arr = result.weights
                if not (arr.flags.writeable and arr.flags.c_contiguous):
                    arr = np.copy(arr)
                written.add(name)
                yield name, torch.from_numpy(arr).to(torch.float32)
                del w, result, arr  # before the next tensor is read
        missing = sorted(self.expected - written)
        if missing:
            raise DGQError(f"GGUF {self.path}: no tensor for {missing[0]}"
                           + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                           + " (the file does not match its own metadata)")

    def write_folder(self, folder: Path, max_shard_size=DEFAULT_STREAM_SHARD, progress: bool | None = None) -> None:
        """Write the Hugging Face folder into the existing, empty ``folder`` (see the module docstring)."""
        tok = _load_tokenizer(self.path)
        writer = CheckpointWriter(folder, max_shard_size)

        def before(nbytes: int) -> None:  # write the shard before reading a tensor it has no room for
            if writer.pending and writer.pending_bytes + nbytes > writer.max_bytes:
                writer.flush()

        for name, t in self.tensors(progress, before):
            writer.add({name: t})
            del t
        writer.finish_weights()
        self.config.dtype = "float32"  # as save_pretrained records a float32 model's dtype and class
        self.config.architectures = [type(self.model).__name__]
        self.config.save_pretrained(folder)
        if self.model.can_generate():
            self.model.generation_config.save_pretrained(folder)
        tok.save_pretrained(folder)


def convert(path, target, max_shard_size=DEFAULT_STREAM_SHARD, replace: bool = False,
            progress: bool | None = None) -> Path:
    """Convert the GGUF file ``path`` into the Hugging Face folder ``target`` (written atomically; an existing
    ``target`` is kept unless ``replace``), holding one tensor and one shard at a time. Returns ``target``."""
    path, target = Path(path).expanduser(), Path(target).expanduser()
    src = GGUFSource(path)
    check_disk(target, src.float32_bytes(), f"the float32 folder of {path.name}")
    log.info("dgq: converting %s to a float32 Hugging Face folder %s (once)", path, target)
    with atomic_folder(target, replace=replace) as tmp:
        src.write_folder(tmp, max_shard_size, progress)
    return target

