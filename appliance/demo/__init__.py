"""The call demo page: the routes that serve it (site.py) next to its own files (index.html,
demo.js, demo.css) and the npm packages it loads (package.json; `npm ci --prefix
appliance/demo` installs them into node_modules/)."""
