"use strict";
// The server redirects a refused token to /login#failed.
if (location.hash === "#failed") {
  document.getElementById("failed").hidden = false;
}
