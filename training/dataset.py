"""Licensed bird photos + metadata -> SDXL training items (pixels, caption, micro-conditioning).

Every photo that reaches a LoRA has passed the same gates (licence, size, sharpness, family), and
every one that did not is listed with the reason, so an ML engineer can fix the metadata instead of
guessing. Captions come from the serving prompt templates: the LoRA learns the exact wording that
serving later asks for. Augmentation draws its randomness from (seed, epoch, index) only, never from
a global RNG, so an item is a pure function of those three numbers and a resumed run sees the same
pixels an uninterrupted one would.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from birdgen.catalogue import Catalogue, UnknownFamilyError
from birdgen.prompts import PromptLibrary
from birdgen.qa.measures import laplacian_variance
from birdgen.schema import ImageRequest, RequestError
from birdgen.training.config import DEFAULT_JITTER, DEFAULT_LICENCES, DEFAULT_MIN_SHARPNESS

METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
REQUIRED_COLUMNS = ("file", "species", "source", "licence", "author")
# Request fields a metadata row may set to describe its photo (the caption then says so).
PROMPT_COLUMNS = ("pose", "season", "lighting", "habitat")
_COLUMN_ALIASES = {"license": "licence"}
# A trailing version, optionally with a jurisdiction port: "-4.0", "-2.0-DE".
_VERSION = re.compile(r"-?\d+(\.\d+)*(-[A-Z]{2,3})?$")
_CC_WORDS = {
    "ATTRIBUTION": "BY",
    "NONCOMMERCIAL": "NC",
    "SHAREALIKE": "SA",
    "NODERIVATIVES": "ND",
    "NODERIVS": "ND",
}
_CC_URL = re.compile(r"creativecommons\.org/(licenses|publicdomain)/([a-z-]+)", re.IGNORECASE)

# Why a photo was left out; `Rejection.reason` is always one of these.
MISSING_FILE = "missing file"
UNREADABLE = "unreadable"
LICENCE = "licence"
TOO_SMALL = "too small"
TOO_BLURRY = "too blurry"
UNKNOWN_FAMILY = "unknown family"
BAD_METADATA = "bad metadata"
DUPLICATE = "duplicate"


class DatasetError(ValueError):
    """The metadata file itself is unusable (missing, malformed line); the message names file and line."""


@dataclass(frozen=True)
class Rejection:
    """A photo left out of training: the file, one of the reason constants above, and the details."""

    file: str
    reason: str
    detail: str = ""


@dataclass(frozen=True)
class PhotoRecord:
    """One accepted photo's metadata. `licence` is the text as given (attribution quotes it);
    `licence_key` is its normalised form (the filter compares that)."""

    file: str
    species: str
    family: str | None
    source: str
    licence: str
    licence_key: str
    author: str
    scientific_name: str | None = None
    caption: str | None = None
    pose: str | None = None
    season: str | None = None
    lighting: str | None = None
    habitat: str | None = None


def normalise_licence(text: str) -> str:
    """The licence kind without version or jurisdiction: "cc by 4.0", "CC-BY-4.0",
    "https://creativecommons.org/licenses/by/4.0/" -> "CC-BY"; "CC0 1.0", "public domain dedication
    (CC0)" -> "CC0"; "CC BY-NC-SA 2.0" -> "CC-BY-NC-SA". Anything else comes back upper-cased with
    '-' separators, so it can still be listed as allowed explicitly."""
    raw = text.strip()
    url = _CC_URL.search(raw)
    if url:
        kind = url.group(2).lower()
        return "CC0" if kind == "zero" else ("PDM" if kind == "mark" else "CC-" + kind.upper())
    key = re.sub(r"[\s_/]+", "-", raw.upper()).strip("-")
    key = re.sub(r"-+", "-", key.replace("(", "-").replace(")", "-")).strip("-")
    if "CC0" in key.split("-") or key.startswith("CC0"):
        return "CC0"
    key = _VERSION.sub("", key)
    for prefix in ("CREATIVE-COMMONS-", "CC-"):
        if key.startswith(prefix):
            parts = key[len(prefix) :].split("-")
            return "CC-" + "-".join(_CC_WORDS.get(part, part) for part in parts)
    if key.startswith("CCBY"):
        return "CC-BY" + key[4:]
    return key


def _read_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) pairs from JSONL or CSV; column names lower-cased, 'license' -> 'licence'."""
    rows: list[tuple[int, dict[str, Any]]] = []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read metadata ({exc})") from exc
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        raw_rows: Iterable[tuple[int, Mapping[str, Any]]] = (
            (i + 2, row) for i, row in enumerate(reader)
        )  # line 1 is the header
    elif path.suffix.lower() in (".jsonl", ".json"):
        parsed = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise DatasetError(f"{path}:{number}: not a JSON object ({exc})") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            parsed.append((number, row))
        raw_rows = parsed
    else:
        raise DatasetError(f"{path}: metadata must be .jsonl or .csv, got {path.suffix!r}")
    for number, row in raw_rows:
        clean = {}
        for key, value in row.items():
            if key is None:
                continue  # csv: extra cells without a header
            name = str(key).strip().lower()
            name = _COLUMN_ALIASES.get(name, name)
            clean[name] = value.strip() if isinstance(value, str) else value
        rows.append((number, clean))
    return rows


def find_metadata(root: Path) -> Path:
    """The metadata file of a photo folder: metadata.jsonl, else metadata.csv."""
    for name in METADATA_NAMES:
        if (root / name).is_file():
            return root / name
    raise DatasetError(f"{root}: no metadata file ({' or '.join(METADATA_NAMES)})")


def _resized_size(width: int, height: int, shortest: int) -> tuple[int, int]:
    """(w, h) scaled so the shortest side is `shortest`; the other never rounds below it."""
    scale = shortest / min(width, height)
    return max(shortest, round(width * scale)), max(shortest, round(height * scale))


class BirdDataset(torch.utils.data.Dataset):
    """Photos of one folder that pass the gates, as SDXL training items.

    An item is a dict: pixel_values (float [3, R, R] in [-1, 1]), caption, original_size (h, w) of the
    upright photo, crop_top_left (top, left) in the resized image, target_size (R, R), and the record.
    """

    def __init__(
        self,
        root: Path,
        metadata: Path | None = None,
        *,
        resolution: int = 512,
        min_side: int | None = None,
        licences: Sequence[str] = DEFAULT_LICENCES,
        family: str | None = None,
        min_sharpness: float = DEFAULT_MIN_SHARPNESS,
        flip: bool = True,
        random_crop: bool = True,
        jitter: float = DEFAULT_JITTER,
        seed: int = 0,
        prompts: PromptLibrary | None = None,
        catalogue: Catalogue | None = None,
    ) -> None:
        if resolution < 8:
            raise ValueError(f"invalid 'resolution': got {resolution}; allowed: an integer >= 8")
        if not 0 <= jitter < 1:
            raise ValueError(f"invalid 'jitter': got {jitter}; allowed: 0 <= jitter < 1")
        if seed < 0:
            raise ValueError(f"invalid 'seed': got {seed}; allowed: an integer >= 0")
        self.root = Path(root)
        self.metadata_path = Path(metadata) if metadata is not None else find_metadata(self.root)
        self.resolution = resolution
        self.min_side = resolution if min_side is None else min_side
        self.licences = tuple(dict.fromkeys(normalise_licence(name) for name in licences))
        self.catalogue = catalogue or Catalogue.load()
        self.family = self.catalogue.family(family) if family else None
        self.min_sharpness = min_sharpness
        self.flip = flip
        self.random_crop = random_crop
        self.jitter = jitter
        self.seed = seed
        self.epoch = 0
        self.prompts = prompts or PromptLibrary.load()
        self.records: list[PhotoRecord] = []
        self.captions: list[str] = []
        self.rejected: list[Rejection] = []
        self._scan()

    # -- building the accepted list ------------------------------------------------------------------
    def _scan(self) -> None:
        seen: set[str] = set()
        for number, row in _read_rows(self.metadata_path):
            name = str(row.get("file") or "").strip()
            if not name:
                self._reject(f"{self.metadata_path.name}:{number}", BAD_METADATA, "no 'file' value")
                continue
            if name in seen:
                self._reject(name, DUPLICATE, f"listed again on line {number}")
                continue
            seen.add(name)
            record_or_reason = self._record(row)
            if isinstance(record_or_reason, Rejection):
                self.rejected.append(record_or_reason)
                continue
            record, caption = record_or_reason
            problem = self._check_image(record.file)
            if problem is not None:
                self.rejected.append(problem)
                continue
            self.records.append(record)
            self.captions.append(caption)

    def _reject(self, file: str, reason: str, detail: str) -> None:
        self.rejected.append(Rejection(file, reason, detail))

    def _record(self, row: Mapping[str, Any]) -> tuple[PhotoRecord, str] | Rejection:
        """The metadata gates (fields, licence, family) and the caption; no image is opened here."""
        file = str(row["file"]).strip()
        missing = [c for c in REQUIRED_COLUMNS if not str(row.get(c) or "").strip()]
        if missing:
            return Rejection(file, BAD_METADATA, f"missing {', '.join(missing)}")
        text = {k: (str(v).strip() if v is not None else "") for k, v in row.items()}
        licence_key = normalise_licence(text["licence"])
        if licence_key not in self.licences:
            return Rejection(
                file, LICENCE, f"{text['licence']!r} is {licence_key}; allowed: {', '.join(self.licences)}"
            )
        try:
            family = self._family(text.get("family", ""), text["species"], text.get("scientific_name", ""))
        except UnknownFamilyError as exc:
            return Rejection(file, UNKNOWN_FAMILY, str(exc))
        if self.family is not None and family != self.family:
            given = family or "none given, species not in the catalogue"
            return Rejection(file, UNKNOWN_FAMILY, f"family {given!r}; training {self.family}")
        prompt_fields = {c: text[c] for c in PROMPT_COLUMNS if text.get(c)}
        try:
            request = ImageRequest(
                species=text["species"],
                scientific_name=text.get("scientific_name") or None,
                style="photo",
                **prompt_fields,
            )
        except RequestError as exc:
            return Rejection(file, BAD_METADATA, str(exc))
        caption = text.get("caption") or self.prompts.build(request).text
        record = PhotoRecord(
            file=file,
            species=request.species,
            family=family,
            source=text["source"],
            licence=text["licence"],
            licence_key=licence_key,
            author=text["author"],
            scientific_name=request.scientific_name,
            caption=text.get("caption") or None,
            **{c: getattr(request, c) for c in prompt_fields},
        )
        return record, caption

    def _family(self, column: str, species: str, scientific_name: str) -> str | None:
        """The family (an order, one LoRA each) of a row: its `family` column, an order
        ("passeriformes") or a taxonomic family the catalogue lists ("Turdidae"); an empty column: the
        catalogue's family for the species, None when it has none. Any other column raises the
        catalogue's UnknownFamilyError."""
        if column:
            return self.catalogue.family(column, taxonomic=True)
        found = self.catalogue.lookup(scientific_name=scientific_name or None, common_name=species)
        return found.family if found else None

    def _check_image(self, file: str) -> Rejection | None:
        """Size and sharpness gates. Sharpness is measured at training scale (shortest side =
        resolution), so one threshold fits photos of any size."""
        path = self.root / file
        if not path.is_file():
            return Rejection(file, MISSING_FILE, f"{path} not found")
        try:
            with Image.open(path) as image:
                width, height = image.size
                if min(width, height) < self.min_side:
                    return Rejection(
                        file, TOO_SMALL, f"{width}x{height}; shortest side must be >= {self.min_side}"
                    )
                target = _resized_size(width, height, self.resolution)
                image.draft("L", target)  # JPEG: decode at a reduced scale, never below the target
                grey = image.convert("L").resize(target, Image.Resampling.BICUBIC)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            return Rejection(file, UNREADABLE, f"{type(exc).__name__}: {exc}")
        sharpness = laplacian_variance(np.asarray(grey))
        if sharpness < self.min_sharpness:
            return Rejection(
                file, TOO_BLURRY, f"sharpness {sharpness:.1f} < {self.min_sharpness} (Laplacian variance)"
            )
        return None

    # -- items ---------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Items of a new epoch get fresh crops, flips and jitter (still a pure function of the seed)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self.records):
            raise IndexError(f"index {index} out of range for {len(self.records)} photos")
        record = self.records[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        # Every draw happens whatever the options, so switching one augmentation off leaves the others'
        # values unchanged.
        crop_u = rng.random(2)
        flip = bool(rng.random() < 0.5) and self.flip
        factors = 1.0 + rng.uniform(-self.jitter, self.jitter, size=3)

        with Image.open(self.root / record.file) as opened:
            image = ImageOps.exif_transpose(opened).convert("RGB")
        original_size = (image.height, image.width)
        size = self.resolution
        width, height = _resized_size(image.width, image.height, size)
        image = image.resize((width, height), Image.Resampling.BICUBIC)
        if self.random_crop:
            top, left = int(crop_u[0] * (height - size + 1)), int(crop_u[1] * (width - size + 1))
        else:
            top, left = (height - size) // 2, (width - size) // 2
        image = image.crop((left, top, left + size, top + size))
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            left = width - left - size  # where the crop sits in the flipped image
        if self.jitter > 0:
            for enhance, factor in zip(
                (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color), factors, strict=True
            ):
                image = enhance(image).enhance(float(factor))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
        return {
            "pixel_values": pixels / 127.5 - 1.0,
            "caption": self.captions[index],
            "original_size": original_size,
            "crop_top_left": (top, left),
            "target_size": (size, size),
            "record": record,
        }

    # -- reporting -----------------------------------------------------------------------------------
    def rejection_counts(self) -> dict[str, int]:
        return dict(Counter(r.reason for r in self.rejected))

    def attribution(self) -> list[dict[str, str]]:
        """Who took each training photo and under which licence: kept with every trained LoRA."""
        return [
            {
                "file": r.file,
                "species": r.species,
                "source": r.source,
                "author": r.author,
                "licence": r.licence,
            }
            for r in self.records
        ]

    def summary(self) -> dict[str, Any]:
        return {
            "metadata": str(self.metadata_path),
            "accepted": len(self.records),
            "rejected": len(self.rejected),
            "rejected_by_reason": self.rejection_counts(),
            "rejections": [asdict(r) for r in self.rejected],
            "licences": list(self.licences),
            "family": self.family,
            "resolution": self.resolution,
            "min_side": self.min_side,
            "min_sharpness": self.min_sharpness,
        }


def _md_cell(value: str) -> str:
    return " ".join(value.replace("|", "\\|").split())


def write_attribution(out_dir: Path, entries: Sequence[Mapping[str, str]], title: str = "") -> list[Path]:
    """ATTRIBUTION.md (for people) and attribution.json (for tools) in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "attribution.json"
    json_path.write_text(json.dumps(list(entries), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    lines = [
        f"# Attribution{': ' + title if title else ''}",
        "",
        f"This model was trained on {len(entries)} photos, used under the licences below.",
        "",
        "| File | Species | Author | Licence | Source |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        "| "
        + " | ".join(_md_cell(str(e[k])) for k in ("file", "species", "author", "licence", "source"))
        + " |"
        for e in entries
    ]
    md_path = out_dir / "ATTRIBUTION.md"
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [md_path, json_path]
