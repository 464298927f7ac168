"""The live dashboard: static files (meshnode/dashboard/static) served at `/dashboard`.

It owns only serving those files (`routes.add_dashboard_routes`); the page itself reads the
admin API (`/admin/mesh`, `/admin/stats`, `/admin/budget`) from the browser. See
docs/dashboard.md.
"""

from meshnode.dashboard.routes import add_dashboard_routes

__all__ = ["add_dashboard_routes"]
