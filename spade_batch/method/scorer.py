"""Scoring images against a fitted model: image kNN, then the pixel search against the K retrieved images."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from spade_batch.formats.calibration_matches import PixelMatches
from spade_batch.formats.model import SpadeModel
from spade_batch.method import matching, pixel_search, spade
from spade_batch.method.alignment import radius_cells
from spade_batch.method.extractor import Extractor, Features
from spade_batch.method.score_rules import ImageScore, image_scores


class Scorer:
    """Scores images against a fitted model.

    On a GPU the gallery is kept on the device when it fits in half its free memory; otherwise
    (and on CPU) the K retrieved images' rows are gathered from the (memory-mapped) gallery.
    """

    def __init__(
        self,
        model: SpadeModel,
        extractor: Extractor,
        chunk_bytes: int | None = None,
        precision: str = "float32",
        images_per_call: int | None = None,
    ):
        self.model, self.extractor, self.method = model, extractor, model.card.settings
        self.normalisation = model.card.normalisation
        self.layer_scales = self.normalisation.layer_scales if self.method.layer_normalise else None
        device = extractor.device
        self.chunk_bytes, self.precision = chunk_bytes or pixel_search.chunk_bytes_for(device), precision
        # Several images per kernel call pay off on a GPU; on a CPU one image already fills the cores.
        self.images_per_call = images_per_call or (extractor.batch_size if device.type == "cuda" else 1)
        self.global_centre = torch.from_numpy(model.centre.global_mean).to(device)
        self.layer_centres = [torch.from_numpy(mean).to(device) for mean in model.centre.layer_means]
        self.radii = [radius_cells(self.method.match_radius, shape.height, extractor.preprocessing.size)
                      for shape in model.card.layer_shapes]
        self.gallery: list[np.ndarray | torch.Tensor] = list(model.gallery)
        if device.type == "cuda" and model.gallery_bytes < torch.cuda.mem_get_info(device)[0] // 2:
            self.gallery = [torch.from_numpy(np.ascontiguousarray(bank)).to(device) for bank in model.gallery]

    def score(self, images: Sequence[np.ndarray]) -> list[ImageScore]:
        """Scores of H x W x 3 uint8 images."""
        if not images:
            return []
        return self.score_prepared(np.stack([self.extractor.prepare(image) for image in images]))

    def score_prepared(self, prepared: np.ndarray) -> list[ImageScore]:
        """Scores of B x S x S x 3 uint8 images already at the working size."""
        if not len(prepared):
            return []
        if self.extractor.layer_shapes != self.model.card.layer_shapes:  # e.g. an extractor built without the model's layers
            raise ValueError(f"the extractor's pixel features ({[vars(s) for s in self.extractor.layer_shapes]}) are not the model's "
                             f"({[vars(s) for s in self.model.card.layer_shapes]}): build the extractor from the model's settings")
        return self.score_features(self.extractor.forward(prepared))

    def score_features(self, features: Features, exclude: np.ndarray | None = None) -> list[ImageScore]:
        """Scores from raw (uncentred) features: image kNN, then the pixel maps, images_per_call at a time.

        exclude: B gallery rows, each image's own, to score gallery images leave-one-out (spade.image_knn).
        """
        knn_scores, neighbours = self._image_knn(features, exclude)
        size = (self.extractor.preprocessing.size, self.extractor.preprocessing.size)
        results = []
        for chunk, layer_maps in self._layer_distances(features, neighbours):
            maps = spade.combine_layer_maps(layer_maps, size, self.method.sigma, self.layer_scales)
            map_scores = spade.map_scores(maps, self.method.map_top).cpu().numpy()
            scores = image_scores(knn_scores[chunk], map_scores, self.method.image_score, self.normalisation)
            for offset, anomaly_map in enumerate(maps.cpu().numpy()):
                row = chunk.start + offset
                results.append(ImageScore(float(scores[offset]), neighbours[row], anomaly_map,
                                          float(knn_scores[row]), float(map_scores[offset])))
        return results

    def match_features(
        self, features: Features, exclude: np.ndarray | None = None, previous: Sequence[PixelMatches | None] | None = None,
    ) -> tuple[np.ndarray, list[PixelMatches]]:
        """Calibration's scoring: each image's kNN score (B float32) and its pixel matches (matching.match_pixels)
        with its K retrieved images, updated from previous[b] (its matches with an earlier gallery) when given.

        exclude: as score_features. The maps are combine_layer_maps of the matches' layer maps (calibration_maps).
        """
        knn_scores, neighbours = self._image_knn(features, exclude)
        matches = []
        for image, retrieved in enumerate(neighbours):
            queries = [self._query(features, image, layer) for layer in range(len(features.layers))]
            matches.append(matching.match_pixels(
                queries, [self.model.train_ids[n] for n in retrieved], self._gallery_rows, self.method.kappa,
                previous[image] if previous is not None else None, self.chunk_bytes, self.precision,
                [(shape.height, shape.width) for shape in self.model.card.layer_shapes], self.radii))
        return knn_scores, matches

    @property
    def finest_layer(self) -> int:
        """The layer in use with the most cells (the shallowest): the one the anomaly map is most finely resolved at."""
        shapes = self.model.card.layer_shapes
        return max(range(len(shapes)), key=lambda layer: shapes[layer].height * shapes[layer].width)

    def nearest_normal(self, features: Features, neighbour_ids: Sequence[Sequence[str]]) -> list[PixelMatches]:
        """Where each cell of the finest layer (finest_layer) found its nearest normal pixel: the model's own pixel search
        (matching.match_pixels: full, or within match_radius; features pooled as the card says) with kappa 1.

        Args:
            features: raw features of B images (Extractor.forward).
            neighbour_ids: per image, its retrieved gallery images (e.g. the scores table's neighbour_ids, nearest first).

        Returns:
            per image, PixelMatches of that one layer (h x w cells): distances h*w x 1 float32 squared, sources h*w x 1
            positions in neighbour_ids[b] of the matched image, cells h*w x 1 the matched cell in that image's h x w
            grid (row-major).
        """
        layer = self.finest_layer
        shape = self.model.card.layer_shapes[layer]

        def rows(ids: Sequence[str], _: int) -> torch.Tensor:
            return self._gallery_rows(ids, layer)

        return [matching.match_pixels([self._query(features, image, layer)], list(ids), rows, 1, None, self.chunk_bytes,
                                      self.precision, [(shape.height, shape.width)], [self.radii[layer]])
                for image, ids in enumerate(neighbour_ids)]

    def _query(self, features: Features, image: int, layer: int) -> torch.Tensor:
        """Image `image`'s h*w x C float32 centred pixel features of `layer`, on the extractor's device."""
        return spade.centre(features.layers[layer][image].to(self.extractor.device), self.layer_centres[layer], dim=0).flatten(1).T

    def _gallery_rows(self, ids: Sequence[str], layer: int) -> torch.Tensor:
        """matching.GalleryRows of this model's gallery, on the extractor's device."""
        rows = np.array([[self.model.row_of[image_id] for image_id in ids]], np.int64)
        return spade.gather_galleries(self.gallery[layer], rows, device=self.extractor.device)[0]

    def _image_knn(self, features: Features, exclude: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        queries = spade.centre(features.global_features, self.global_centre).cpu().numpy()
        return spade.image_knn(self.model.index, queries, self.method.k, exclude)

    def _layer_distances(self, features: Features, neighbours: np.ndarray) -> Iterator[tuple[slice, list[torch.Tensor]]]:
        """Per images_per_call images: their slice, and per layer their B x h_l x w_l squared distance maps."""
        device = self.extractor.device
        for start in range(0, len(neighbours), self.images_per_call):
            chunk = slice(start, min(start + self.images_per_call, len(neighbours)))
            layers = [spade.centre(layer[chunk].to(device), mean, dim=1) for layer, mean in zip(features.layers, self.layer_centres)]
            galleries = [spade.gather_galleries(bank, neighbours[chunk], device=device) for bank in self.gallery]
            yield chunk, spade.layer_distance_maps(layers, galleries, self.method.kappa, self.chunk_bytes, self.precision, self.radii)
