"""The search page (HTML, CSS, JavaScript) and the server behind it (`pipelines.web.app`)."""
