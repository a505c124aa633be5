from .shapes import SHAPES_CLASSES, register_shapes, write_shapes
