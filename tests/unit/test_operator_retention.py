"""spec.retention (pure): what goes with a deleted job, by a finalizer that never holds it for long."""
from __future__ import annotations

from datetime import timedelta

from dreambooth_api.v1alpha1.spec import RetentionSpec, parse_spec
from dreambooth_operator import retention
from tests.unit.test_operator_lifecycle import SPEC, T0

OUT = "s3://dreambooth/jobs/ns/rex/u"
PHOTOS = "s3://subjects/rex"


def test_retain_is_the_default_and_puts_no_finalizer() -> None:
    spec = parse_spec(SPEC)
    assert (spec.retention.outputs, spec.retention.subject_photos) == ("Retain", "Retain")
    assert retention.finalizers_wanted([], spec.retention) is None
    assert retention.finalizers_wanted(["other"], RetentionSpec(outputs="Delete")) == ["other", retention.FINALIZER]
    # Back to Retain: the finalizer goes (a deletion then waits for nothing).
    assert retention.finalizers_wanted(["other", retention.FINALIZER], RetentionSpec()) == ["other"]


def test_delete_removes_the_outputs_and_asked_for_photos_then_lets_go() -> None:
    plan = retention.release({"outputUri": OUT}, RetentionSpec(outputs="Delete", subjectPhotos="Delete"), PHOTOS, T0, T0)
    assert plan.prefixes == (("outputs", OUT), ("subject photos", PHOTOS)) and not plan.let_go
    only_photos = retention.release({"outputUri": OUT}, RetentionSpec(subjectPhotos="Delete"), PHOTOS, T0, T0)
    assert only_photos.prefixes == (("subject photos", PHOTOS),)
    never_accepted = retention.release({}, RetentionSpec(outputs="Delete"), PHOTOS, T0, T0)
    assert never_accepted.let_go and never_accepted.prefixes == ()


def test_a_deletion_is_never_held_for_long() -> None:
    asked = RetentionSpec(outputs="Delete")
    trying = retention.release({"outputUri": OUT}, asked, PHOTOS, T0, T0 + timedelta(seconds=60), "storage unreachable")
    assert not trying.let_go and trying.retry_in == retention.RETRY_SECONDS
    late = T0 + timedelta(seconds=retention.RELEASE_AFTER_SECONDS + 1)
    gone = retention.release({"outputUri": OUT}, asked, PHOTOS, T0, late, "storage unreachable")
    assert gone.let_go and gone.prefixes == () and OUT in gone.warning and "storage unreachable" in gone.warning
    unreadable = retention.release({"outputUri": OUT}, None, None, T0, T0)
    assert unreadable.let_go and "not" in unreadable.warning
