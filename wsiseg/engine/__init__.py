"""The whole-slide engine: loader, blender, predictors and the slide loop."""
