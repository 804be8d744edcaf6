"""Service settings from the environment (``SPECIESID_*``) or an env file, via pydantic-settings."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from retrieval.encoders import EncoderConfig


class Settings(BaseSettings):
    """Everything the HTTP service can be configured with."""

    model_config = SettingsConfigDict(env_prefix="SPECIESID_", env_file=".env", extra="ignore",
                                      hide_input_in_errors=True)  # errors never echo an API key

    index: str = Field("runs/gallery", description="gallery directory (built with `speciesid index build`)")
    api_keys: str = Field("", description="comma-separated keys accepted in X-API-Key for writes")
    reads_require_key: bool = Field(False, description="also require X-API-Key for reads")
    max_upload_mb: float = Field(20.0, description="largest accepted photo, in MB (bigger -> 413)")
    max_pixels: int = Field(50_000_000, description="largest accepted photo, in pixels (decompression-bomb guard)")
    # The pixels of all the photos of one request, summed from their headers before any is decoded (bigger -> 413):
    # it bounds the decoding one request may ask of the server, which max_pixels bounds per photo only. The
    # default admits an identify at its own limits (max_images 5 x max_pixels 50 MP = 250 MP) and an add of
    # max_add_images 50 photos from a 12 MP phone camera (600 MP).
    max_request_megapixels: float = Field(600.0, gt=0, description="pixels of all the photos of one request, in "
                                          "millions, read from their headers before any is decoded (more -> 413)")
    max_images: int = Field(5, description="photos per identify request (one observation)")
    max_add_images: int = Field(50, description="photos per add-references request")
    max_request_mb: float = Field(256.0, description="largest request body of any route, in MB (bigger -> 413)")
    max_identify_in_flight: int = Field(
        default_factory=lambda: max(1, (os.cpu_count() or 2) // 2), ge=1,
        description="identify/search requests served at once; past it a fast 429 with Retry-After (default: one "
        "per two cores; on 2 cores 1 kept the c=64 p99 at 3-4x the c=1 p99, 4 gave 22x: docs/api.md)")
    retry_after_s: int = Field(1, ge=1, description="shortest Retry-After of a 429, in seconds")
    retry_jitter_s: int = Field(2, ge=0, description="Retry-After is drawn from retry_after_s .. retry_after_s + "
                                "retry_jitter_s, so shed clients do not all come back in the same second")
    min_reference_px: int = Field(32, ge=1, description="shortest side a reference photo may have, in pixels")
    # The CLI waits 600 s for another writer; a client of the server waits on the answer, and most give up long before.
    write_wait_s: float = Field(30.0, ge=0.0, description="how long an add or delete waits for another writer of the "
                                "gallery (another process, or on S3 another machine's lease) before a 503 with "
                                "Retry-After, in seconds")
    refresh_s: float = Field(1.0, ge=0.0, description="how late, at most, the server sees other processes' writes")
    device: str = Field("auto", description="encoder device: auto, cpu, cuda, cuda:N")
    precision: str = Field("auto", description="encoder precision: auto, fp32, bf16, int8, fp16 (CUDA)")
    runtime: str = Field("auto", description="inference runtime: auto (fastest faithful for this CPU), torch, onnx, "
                         "openvino (docs/runtimes.md)")
    batch_window_ms: float = Field(5.0, description="how long the encoder waits to batch concurrent requests")
    max_batch: int = Field(32, description="largest batch the encoder runs at once")
    thumbnail_px: int = Field(256, description="longest side of reference thumbnails")

    @field_validator("api_keys")
    @classmethod
    def _printable_ascii_keys(cls, value: str) -> str:
        """Keys travel in an HTTP header, which carries ASCII: a key with other characters could never match."""
        bad = [k.strip() for k in value.split(",") if not all(" " < ch < "\x7f" for ch in k.strip())]
        if bad:
            raise ValueError("SPECIESID_API_KEYS: a key may hold printable ASCII characters only (no spaces, accents "
                             f"or other letters), as HTTP headers carry no others; {len(bad)} key(s) do not")
        return value

    @field_validator("runtime", "precision")
    @classmethod
    def _known_choice(cls, value: str, info) -> str:
        """A bad SPECIESID_RUNTIME / SPECIESID_PRECISION is refused at start, not when the model loads."""
        from retrieval.encoders import PRECISIONS, RUNTIMES

        choices = RUNTIMES if info.field_name == "runtime" else PRECISIONS
        if value not in choices:
            raise ValueError(f"SPECIESID_{info.field_name.upper()}: {value!r} is not one of {', '.join(choices)}")
        return value

    def encoder_config(self) -> EncoderConfig:
        """How the gallery's encoder runs here: device, precision and runtime (the rest is the gallery's own)."""
        from retrieval.encoders import EncoderConfig

        return EncoderConfig(device=self.device, precision=self.precision, runtime=self.runtime)

    def startup_warnings(self) -> list[str]:
        """What an operator should hear when the server starts: settings that refuse writes, or every read."""
        if self.key_list():
            return []
        if self.reads_require_key:
            return ["SPECIESID_READS_REQUIRE_KEY is set but no SPECIESID_API_KEYS is: every read (identify, search, "
                    "species, thumbnails) and every write will be refused with 401; set SPECIESID_API_KEYS, or unset "
                    "SPECIESID_READS_REQUIRE_KEY"]
        return ["no SPECIESID_API_KEYS set: writes (adding/deleting references) are disabled"]

    def key_list(self) -> list[str]:
        """The configured API keys (empty strings dropped)."""
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]
