"""Adding normal images to a model, as the method defines it: which ids are new, which are refused (same id, other
content) and which failed before; which images the grown model uses (the parent's kept before new copies of them);
whether that changes anything; then the one fit recipe over the parts of every version and the new ones, reusing the
parent's calibration matches. The engine distributes it (engine.add), formats store it (formats.versions: the next
version, under the model's lock); `detector.add` runs it in this process.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import pyarrow as pa

from spade_batch.config import Settings
from spade_batch.formats import storage
from spade_batch.formats.calibration_matches import PixelMatches, read_matches
from spade_batch.formats.card import ModelCard, ModelError, VersionRecord
from spade_batch.formats.feature_index import StoredFeatures
from spade_batch.formats.integrity import read_checked
from spade_batch.formats.layout import ModelLayout, part_files
from spade_batch.formats.manifest import pairs_sha256
from spade_batch.formats.versions import ModelVersion, NextVersion
from spade_batch.method.calibration_search import HeldOutScorer
from spade_batch.method.extractor import Extractor
from spade_batch.method.recipe import FitResult, Selection, fit_from_features, select_training

log = logging.getLogger(__name__)


def new_images(held: dict[str, str | None], incoming: dict[str, str | None]) -> list[str]:
    """The ids of `incoming` that the model does not hold, sorted.

    held: id -> content_sha256 of the images the model holds (None: unknown, features written before it was recorded).
    incoming: id -> content_sha256 of the images offered (read only for the ids the model holds).
    An id it holds is skipped when its content is the same (or unknown); with other content it is a ValueError naming it.
    """
    changed = sorted(i for i, sha256 in incoming.items() if i in held and held[i] is not None and held[i] != sha256)
    if changed:
        raise ValueError(
            f"{len(changed)} images have the id of an image the model holds but other content (first: {changed[0]}); "
            "an id names one image: rename the new images, or fit a new model"
        )
    unknown = [i for i in incoming if i in held and held[i] is None]
    if unknown:
        log.warning("add: %d images the model holds have no recorded content hash (fitted before it was recorded), e.g. %s: "
                    "skipped as the same images", len(unknown), unknown[0])
    return sorted(set(incoming) - set(held))


@dataclass(frozen=True)
class Addition:
    """An add to the model at model_uri: its current version (the parent), the stored features of the parent's
    training images (the parts of the parent and its ancestors), and the version it publishes.

    Attributes:
        model_uri: the model's root.
        parent: the current version, which the images are added to.
        card: the parent's card.
        parts: the feature parts of the parent and its ancestors, oldest version first.
        trained: the parent's training images (StoredFeatures over those parts).
        number: the version it publishes.
    """

    model_uri: str
    parent: ModelVersion
    card: ModelCard
    parts: list[str]
    trained: StoredFeatures
    number: int

    @classmethod
    def onto(cls, version: NextVersion, options: storage.StorageOptions = None) -> Addition:
        """The add that publishes `version` (formats.versions.adding_version), its parent's training images indexed."""
        return cls(version.model_uri, version.parent, version.card, version.parts, StoredFeatures.index(version.parts, options),
                   version.number)

    @property
    def target(self) -> ModelLayout:
        """The folder of the version this add publishes; its features/ gets the new images' parts."""
        return ModelLayout(self.model_uri).version(self.number)

    def new_ids(self, incoming: dict[str, str | None], failed_before: Sequence[dict[str, str]] = ()) -> list[str]:
        """new_images against the parent's readable training images, less the failed ones not tried again (failed_before)."""
        again = {entry["id"] for entry in failed_before}
        return [i for i in new_images({i: self.trained.sources[i][1] for i in self.trained.parts}, incoming) if i not in again]

    def failed_before(self, listed: Collection[str], hashes: Mapping[str, str]) -> list[dict[str, str]]:
        """The parent's failed images among `listed` that are not tried again, with their recorded errors: their content is
        the one they failed with, or they cannot be read now (hashes: id -> content_sha256 of the images read). An image
        with other content now is tried again. So a re-run of an add reports the failures its first run did."""
        wanted = set(listed)
        return [entry for entry in self.trained.failures
                if entry["id"] in wanted and hashes.get(entry["id"]) in (None, self.trained.sources[entry["id"]][1])]

    def parent_used(self, settings: Settings) -> set[str]:
        """The images the parent's gallery and calibration use: as its card records them, else (a card from before the
        record) as the recipe selects them now."""
        if self.card.training is not None:
            return set(self.trained.parts) - set(self.card.training.unused())
        return select_training(self.trained, settings).used

    def select(self, features: StoredFeatures, settings: Settings) -> Selection:
        """select_training of the grown model's features (self.features()), the parent's images kept before new copies of them."""
        return select_training(features, settings, self.parent_used(settings))

    def changes(self, selection: Selection, settings: Settings) -> bool:
        """Whether the grown model's gallery or calibration would differ from the parent's (else nothing is published)."""
        return selection.used != self.parent_used(settings)

    def left_out(self, selection: Selection, new: Collection[str], settings: Settings) -> list[dict[str, str]]:
        """{"id", "reason"} of the images the grown model does not use that are new or that the parent used, by id."""
        unused, concerned = selection.record().unused(), set(new) | self.parent_used(settings)
        return [{"id": image_id, "reason": unused[image_id]} for image_id in sorted(unused) if image_id in concerned]

    def check(self, extractor: Extractor) -> None:
        """Refuse an extractor whose features would not be the parent's: other weights found now, or another preprocessing
        derived from the model's settings (a package whose backbone convention changed)."""
        if (extractor.weights_sha256, extractor.preprocessing) != (self.card.weights_sha256, self.card.preprocessing):
            raise ValueError(
                f"the backbone weights or preprocessing found now differ from those of model {self.model_uri} "
                f"(weights sha256 {extractor.weights_sha256[:12]}... vs {self.card.weights_sha256[:12]}...): "
                "new images' features would not be comparable; restore the weights, or fit a new model"
            )

    def features(self) -> StoredFeatures:
        """Every training image of the grown model: the parent's parts, then those in target.features."""
        options = self.trained.options
        return StoredFeatures.index([*self.parts, *part_files(self.target.features, options)], options)

    def fit(
        self, features: StoredFeatures, extractor: Extractor, settings: Settings, folder: str, added: tuple[Sequence[str], Sequence[str]],
        selection: Selection, failures: Sequence[dict[str, str]] = (), held_out: HeldOutScorer | None = None,
    ) -> FitResult:
        """The one recipe over features (self.features()), gallery files in the local `folder` (card not saved).

        added: (ids, uris) of the images this add extracted and could read; selection: self.select(features, settings);
        failures: its images that were never extracted.
        """
        version = VersionRecord(self.number, self.parent.number, len(added[0]), pairs_sha256(*added), self.left_out(selection, added[0], settings))
        return fit_from_features(features, extractor, settings, folder, [*self._rejected(), *failures], held_out, version,
                                 self.previous_matches(), selection)

    def previous_matches(self) -> dict[str, PixelMatches]:
        """The parent's calibration matches (formats.calibration_matches), checked against its card; none, so that every calibration
        image is searched, when it has none (fitted before they were kept) or they cannot be read or do not match."""
        name = ModelLayout.calibration_matches
        if name not in self.card.files:
            log.info("add: version %d keeps no calibration matches (fitted before they were kept): every calibration image is searched",
                     self.parent.number)
            return {}
        try:
            return read_matches(read_checked(self.parent.uri, self.card, name, self.trained.options), self.card.layer_shapes)
        except ModelError:
            reason: object = "its SHA-256 is not the one the card records"
        except (OSError, ValueError, pa.ArrowException) as error:
            reason = error
        log.warning("add: %s cannot be used (%s): every calibration image is searched", ModelLayout(self.parent.uri).file(name), reason)
        return {}

    def _rejected(self) -> list[dict[str, str]]:
        """The parent's failed images that have no row in its parts (names the manifest rejected): the card keeps them."""
        return [entry for entry in self.card.failed_train_images if entry["id"] not in self.trained.sources]
