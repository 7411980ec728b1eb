"""The operator web page (``/ui``): static HTML, JS and CSS; all data comes from the JSON API."""
