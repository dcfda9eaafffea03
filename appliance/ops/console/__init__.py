"""The operator page on the admin listener (`/admin/`): the routes that serve it (site.py)
next to its own files (index.html, console.js, console.css).  The charting library it
loads (uPlot) is an npm package of appliance/demo/package.json, installed with the demo
page's by `npm ci --prefix appliance/demo`."""
