"""Reading whole-slide images: the Slide abstraction, tissue masks and integer tile grids."""

from wsiseg.slide.reader import Bounds, Slide, open_slide

__all__ = ["Bounds", "Slide", "open_slide"]
