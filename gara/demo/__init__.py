"""``gara demo``: a web page that shows the frozen base and chosen models side by side on any
image under any corruption of our generator (session: the computation, server: the page and its
API, client: the API from Python). Kept free of heavy imports: the CLI reads the default below."""

# The embedded held-out split (the corrupt stage's input in dvc.yaml): real photos with ground truth.
DEFAULT_SAMPLES = "data/val"
