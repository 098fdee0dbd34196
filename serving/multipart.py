"""multipart/form-data bodies (what the OpenAI SDKs send to /v1/images/edits), read with the
standard library's MIME parser: the body was already read whole and bounded by its size."""
from __future__ import annotations

from dataclasses import dataclass
from email import policy
from email.parser import BytesParser

MAX_PARTS = 64
MAX_FIELD_BYTES = 64 * 1024


class MultipartError(ValueError):
    """The body is not a multipart form this server can read (the message says why)."""


@dataclass(frozen=True)
class FormPart:
    name: str
    filename: str | None  # None for a plain field
    content_type: str
    data: bytes

    def text(self) -> str:
        try:
            return self.data.decode("utf-8")
        except UnicodeDecodeError:
            raise MultipartError(f"{self.name}: the value is not UTF-8 text") from None


def parse_multipart(content_type: str, body: bytes) -> list[FormPart]:
    """Every part of a multipart/form-data body, in order; MultipartError when it is not one."""
    if "boundary=" not in content_type:
        raise MultipartError("the multipart body names no boundary (Content-Type: multipart/form-data; boundary=...)")
    message = BytesParser(policy=policy.HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise MultipartError("the body is not a multipart form")
    parts = []
    for part in message.iter_parts():
        if len(parts) >= MAX_PARTS:
            raise MultipartError(f"the form has more than {MAX_PARTS} parts")
        name = part.get_param("name", header="content-disposition")
        if not name:
            raise MultipartError("a part of the form has no name (Content-Disposition: form-data; name=...)")
        data = part.get_payload(decode=True) or b""
        filename = part.get_filename()
        if filename is None and len(data) > MAX_FIELD_BYTES:
            raise MultipartError(f"{name}: a field of more than {MAX_FIELD_BYTES} bytes")
        parts.append(FormPart(str(name), filename, part.get_content_type(), data))
    defects = [*message.defects, *(defect for part in message.iter_parts() for defect in part.defects)]
    if defects:
        raise MultipartError(f"the multipart body is malformed ({type(defects[0]).__name__})")
    return parts
