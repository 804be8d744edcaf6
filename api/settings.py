"""Service settings from the environment (``SPECIESID_*``) or an env file, via pydantic-settings."""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from index.compaction import COMPACT_FRAGMENTS, parse_compact_fragments
from index.lease import LEASE_TTL_S, parse_lease_ttl
from index.locks import parse_wait
from index.photos import DEFAULT_MAX_PIXELS, PHOTO_MAX_PIXELS
from index.store_cache import INDEX_CACHE_MB, INDEX_ENV, METADATA_CACHE_MB, METADATA_ENV, parse_cache_mb

if TYPE_CHECKING:
    from retrieval.encoders import EncoderConfig

#: ``SPECIESID_*`` variables read outside the server's settings (the model cache, the CPU kind, the benchmarks' and
#: tests' helpers): not a typo when set. A test (tests/test_settings.py) checks that every name the code reads is a
#: setting or here.
OTHER_VARIABLES = ("SPECIESID_CACHE", "SPECIESID_CPU_KIND", "SPECIESID_PEER_BIOCLIP", "SPECIESID_PEER_PHASH",
                   "SPECIESID_CHROMIUM", "SPECIESID_CHROMEDRIVER", "SPECIESID_SCREENSHOT", "SPECIESID_REQUIRE_ALL",
                   "SPECIESID_SHARED")


class Settings(BaseSettings):
    """Everything the HTTP service can be configured with."""

    model_config = SettingsConfigDict(env_prefix="SPECIESID_", env_file=".env", extra="ignore",
                                      hide_input_in_errors=True)  # errors never echo an API key

    index: str = Field("runs/gallery", description="gallery directory (built with `speciesid index build`)")
    api_keys: str = Field("", description="comma-separated keys accepted in X-API-Key for writes")
    reads_require_key: bool = Field(False, description="also require X-API-Key for reads")
    max_upload_mb: float = Field(20.0, gt=0, description="largest accepted photo, in MB (bigger -> 413)")
    # The default and the cap are index.photos' PHOTO_MAX_PIXELS and DEFAULT_MAX_PIXELS; _max_pixels checks the
    # bounds (parse_max_pixels: 1 to the cap), in the command line's words.
    max_pixels: int = Field(PHOTO_MAX_PIXELS,
                            description="most pixels one photo may decode to (decompression-bomb guard), at most "
                            f"{DEFAULT_MAX_PIXELS}: no photo over that as stored is taken; the command line reads "
                            "it too")
    # The pixels of all the photos of one request, summed from their headers before any is decoded (bigger -> 413):
    # it bounds the decoding one request may ask of the server, which max_pixels bounds per photo only. The
    # default admits an identify at its own limits (max_images 5 x max_pixels 50 MP = 250 MP) and an add of
    # max_add_images 50 photos from a 12 MP phone camera (600 MP).
    max_request_megapixels: float = Field(600.0, gt=0, description="pixels of all the photos of one request, in "
                                          "millions, read from their headers before any is decoded (more -> 413)")
    max_images: int = Field(5, ge=1, description="photos per identify request (one observation)")
    max_add_images: int = Field(50, ge=1, description="photos per add-references request")
    max_request_mb: float = Field(256.0, gt=0, description="largest request body of any route, in MB (bigger -> 413)")
    max_identify_in_flight: int = Field(
        default_factory=lambda: max(1, (os.cpu_count() or 2) // 2), ge=1,
        description="identify/search requests served at once; past it a fast 429 with Retry-After (default: one "
        "per two cores; on 2 cores 1 kept the c=64 p99 at 3-4x the c=1 p99, 4 gave 22x: docs/api.md)")
    # An identify's or search's body is received whole before the request takes one of those slots (a slow client
    # holds none); this bounds how long one connection may take to send it. At 1 Mbit/s (a weak mobile link) 120 s
    # carries 15 MB, three 5 MB phone photos; past it a 408 and the connection closed. Adds have no such deadline
    # (a key is needed, and they hold no slot).
    body_timeout_s: float = Field(120.0, gt=0, description="seconds an identify or search request may take to send "
                                  "its whole body; past it a 408 (the body is read before the request takes an "
                                  "identify slot, so a slow client holds none)")
    # Identify/search bodies being received at once (each admitted, its slot not yet taken), past which a 429 before
    # a byte is read: what slow or stalled clients can hold is bounded by it (a photo's part in memory up to 1 MB,
    # then a temporary file under TMPDIR, up to the route's body limit; a JSON search's body in memory). Unset: 4 per
    # identify slot, so the next few bodies upload while the slots work (a request shed after its upload has wasted
    # it) and the temporary space is bounded at 4 x slots x the identify body limit (101 MB at the defaults).
    max_receiving: int | None = Field(None, ge=1, description="identify/search request bodies received at once, "
                                      "before they take a slot; past it a 429 with Retry-After before the body is "
                                      "read (default: 4 x SPECIESID_MAX_IDENTIFY_IN_FLIGHT)")
    # A stop (SIGTERM, Ctrl-C) closes the listener at once and lets requests finish for this long; past it the ones
    # still running are cut (bodies still arriving: a stalled upload would otherwise hold the stop for
    # body_timeout_s). Below the usual 30 s a service manager waits before SIGKILL (Kubernetes' grace; systemd's is
    # 90 s). An add that is committing is never cut: the stop waits for it (api.server), and for no other write (one
    # waiting for the gallery's lock is refused): the stop lasts this grace plus that commit at most, then up to
    # api.server.SETTLE_S (10 s) more for the stop's last log line only (nothing is written then).
    shutdown_grace_s: float = Field(25.0, ge=0, description="seconds a stop (SIGTERM, Ctrl-C) lets requests in "
                                    "flight finish before it cuts them (uploads still arriving included); an add "
                                    "that is committing always finishes")
    retry_after_s: int = Field(1, ge=1, description="shortest Retry-After of a 429, in seconds")
    retry_jitter_s: int = Field(2, ge=0, description="Retry-After is drawn from retry_after_s .. retry_after_s + "
                                "retry_jitter_s, so shed clients do not all come back in the same second")
    min_reference_px: int = Field(32, ge=1, description="shortest side a reference photo may have, in pixels")
    # The CLI waits 600 s for another writer; a client of the server waits on the answer, and most give up long before.
    write_wait_s: float = Field(30.0, description="how long an add or delete waits for another writer of the "
                                "gallery (another process, or on S3 another machine's lease), and for its turn "
                                "behind this server's own writes, before a 503 with Retry-After, in seconds "
                                "(an add's photos are embedded before: not counted)")
    refresh_s: float = Field(1.0, ge=0.0, description="how late, at most, the server sees other processes' writes")
    lease_ttl_s: float = Field(LEASE_TTL_S, description="a store on S3: how long this server's write lease "
                               "lasts unrenewed before another machine may take it over (a server killed or cut off), "
                               "in seconds; the CLI reads the same variable")
    # Each add or exclusion is one store commit and leaves one small fragment, which every later read opens (a delete
    # leaves none, and compacts the ones due): a write merges them once this many pile up
    # (index.compaction.COMPACT_FRAGMENTS; docs/shared-gallery.md, "Store growth").
    compact_fragments: int = Field(COMPACT_FRAGMENTS, description="small store fragments at which a write merges "
                                   "them (and, at most once a day, prunes store versions superseded more than 7 "
                                   "days ago); 0: never (then run 'speciesid index compact'); the CLI reads the "
                                   "same variable")
    # LanceDB caches the manifest of each store version it reads, and each add or exclusion is one: without a cap a
    # server grew ~150 kB per add (index.store_cache; docs/scale.md, "What breaks first").
    store_metadata_cache_mb: int = Field(METADATA_CACHE_MB, description="MiB of store manifests (one per table "
                                         "version) LanceDB keeps cached; the CLI reads the same variable")
    store_index_cache_mb: int = Field(INDEX_CACHE_MB, description="MiB of store index pages (the id and sha256 "
                                      "lookups) LanceDB keeps cached; the CLI reads the same variable")
    device: str = Field("auto", description="encoder device: auto, cpu, cuda, cuda:N")
    precision: str = Field("auto", description="encoder precision: auto, fp32, bf16, int8, fp16 (CUDA)")
    runtime: str = Field("auto", description="inference runtime: auto (fastest faithful for this CPU), torch, onnx, "
                         "openvino (docs/runtimes.md)")
    batch_window_ms: float = Field(5.0, ge=0, description="how long the encoder waits to batch concurrent requests")
    max_batch: int = Field(32, ge=1, description="largest batch the encoder runs at once")
    thumbnail_px: int = Field(256, ge=1, description="longest side of reference thumbnails")

    @model_validator(mode="after")
    def _receiving_default(self) -> Settings:
        """``max_receiving`` unset: 4 per identify slot."""
        if self.max_receiving is None:
            self.max_receiving = 4 * self.max_identify_in_flight
        return self

    @classmethod
    def load(cls, **overrides: object) -> Settings:
        """The settings from the environment and ``.env`` (``overrides``: what command-line options set); a refused
        value is a :class:`SettingsError` in one line naming each variable and its value (never an API key's)."""
        try:
            return cls(**overrides)
        except ValidationError as exc:
            raise SettingsError(exc) from None

    @field_validator("api_keys")
    @classmethod
    def _printable_ascii_keys(cls, value: str) -> str:
        """Keys travel in an HTTP header, which carries ASCII: a key with other characters could never match."""
        bad = [k.strip() for k in value.split(",") if not all(" " < ch < "\x7f" for ch in k.strip())]
        if bad:
            raise ValueError("SPECIESID_API_KEYS: a key may hold printable ASCII characters only (no spaces, accents "
                             f"or other letters), as HTTP headers carry no others; {len(bad)} key(s) do not")
        return value

    @field_validator("write_wait_s", "lease_ttl_s", mode="before")
    @classmethod
    def _seconds(cls, value: object, info: ValidationInfo) -> float:
        """SPECIESID_WRITE_WAIT_S / SPECIESID_LEASE_TTL_S through the same parser as the command line's
        (``index.locks.parse_wait``, ``index.lease.parse_lease_ttl``): finite, within the bounds Python's locks
        accept, or refused at start naming the variable."""
        parse = parse_wait if info.field_name == "write_wait_s" else parse_lease_ttl
        return parse(value)  # type: ignore[arg-type]

    @field_validator("max_pixels", mode="before")
    @classmethod
    def _max_pixels(cls, value: object) -> int:
        """SPECIESID_MAX_PIXELS through the command line's parser (``retrieval.images.parse_max_pixels``): a whole
        number from 1 to DEFAULT_MAX_PIXELS, or refused at start naming the variable."""
        from retrieval.images import parse_max_pixels  # here: it loads PIL and pillow-heif

        return parse_max_pixels(value)  # type: ignore[arg-type]

    @field_validator("compact_fragments", mode="before")
    @classmethod
    def _fragments(cls, value: object) -> int:
        """SPECIESID_COMPACT_FRAGMENTS through the command line's parser (``index.compaction.parse_compact_fragments``):
        a whole number, 0 or more, or refused at start naming the variable."""
        return parse_compact_fragments(value)  # type: ignore[arg-type]

    @field_validator("store_metadata_cache_mb", "store_index_cache_mb", mode="before")
    @classmethod
    def _cache_mb(cls, value: object, info: ValidationInfo) -> int:
        """SPECIESID_STORE_METADATA_CACHE_MB / _INDEX_CACHE_MB through the command line's parser
        (``index.store_cache.parse_cache_mb``): a whole number of MiB, 1 to 16777216 (16 TiB), or refused at start."""
        name = METADATA_ENV if info.field_name == "store_metadata_cache_mb" else INDEX_ENV
        return parse_cache_mb(name, value)  # type: ignore[arg-type]

    @field_validator("device", "runtime", "precision", mode="before")
    @classmethod
    def _run_option(cls, value: object, info: ValidationInfo) -> str:
        """SPECIESID_DEVICE / _RUNTIME / _PRECISION read as the command line reads them (``retrieval.encoders.
        read_option``: spaces and case ignored, an empty value is auto) and a bad one refused at start, in the
        command line's words naming the variable, not when the model loads."""
        from retrieval.encoders import read_option

        return read_option(info.field_name, value, f"SPECIESID_{info.field_name.upper()}")

    def encoder_config(self) -> EncoderConfig:
        """How the gallery's encoder runs here: device, precision and runtime (the rest is the gallery's own)."""
        from retrieval.encoders import EncoderConfig, run_options

        # the command line's rule (the values here come from the same variables, or from .env or serve's options)
        return EncoderConfig(**run_options(self.device, self.runtime, self.precision))

    def startup_warnings(self) -> list[str]:
        """What an operator should hear when the server starts: settings that refuse writes, or every read."""
        if self.key_list():
            return []
        if self.reads_require_key:
            return ["SPECIESID_READS_REQUIRE_KEY is set but no SPECIESID_API_KEYS is: every read (identify, search, "
                    "species, thumbnails) and every write will be refused with 401; set SPECIESID_API_KEYS, or unset "
                    "SPECIESID_READS_REQUIRE_KEY"]
        return ["no SPECIESID_API_KEYS set: writes (adding/deleting references) are disabled"]

    @classmethod
    def unknown_variables(cls, environ: Mapping[str, str] | None = None, env_file: str | Path | None = None
                          ) -> list[str]:
        """One line per ``SPECIESID_*`` variable set (in ``environ``, default the process's, or in ``env_file``,
        default the settings' ``.env``) that no setting reads: a misspelt name would otherwise be dropped without
        a word. Each names the closest known variable when one is close."""
        prefix = cls.model_config["env_prefix"]
        known = {f"{prefix}{n.upper()}" for n in cls.model_fields} | set(OTHER_VARIABLES)
        names = {k.upper() for k in (os.environ if environ is None else environ)}
        path = Path(env_file if env_file is not None else cls.model_config["env_file"])
        if path.is_file():
            from dotenv import dotenv_values  # pydantic-settings' own .env reader

            names |= {k.upper() for k in dotenv_values(path)}
        lines = []
        for name in sorted(n for n in names if n.startswith(prefix) and n not in known):
            # compared without the prefix they all share, which would make any two names look alike
            close = difflib.get_close_matches(name[len(prefix):], sorted(k[len(prefix):] for k in known), n=1)
            lines.append(f"{name} is set but is not a setting of speciesid: it is ignored" + (
                f" (did you mean {prefix}{close[0]}?)" if close else " (the settings: docs/api.md, 'Settings')"))
        return lines

    def key_list(self) -> list[str]:
        """The configured API keys (empty strings dropped)."""
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]


class SettingsError(ValueError):
    """Settings refused at start, said in one line: ``SPECIESID_MAX_IMAGES=abc: input should be a valid integer``
    (several joined by ``; ``), rather than pydantic's report naming the Python field."""

    def __init__(self, exc: ValidationError) -> None:
        prefix = Settings.model_config["env_prefix"]
        parts = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err.get("loc") else ""
            name = f"{prefix}{field.upper()}" if field else "settings"
            msg = str(err["msg"]).removeprefix("Value error, ")
            if msg.startswith(name):  # a validator of ours names the variable already
                parts.append(msg)
                continue
            msg = msg[:1].lower() + msg[1:]
            value = err.get("input")
            shown = "" if field == "api_keys" or value is None or isinstance(value, dict) else f"={str(value)[:80]}"
            parts.append(f"{name}{shown}: {msg}")
        super().__init__("; ".join(parts))
