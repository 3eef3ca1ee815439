"""``gara demo``: a web page that shows the frozen base and chosen models side by side on any
image under any corruption of our generator (session: the computation, server: the page and its
API, client: the API from Python, screenshot: the page in a real Chromium)."""
