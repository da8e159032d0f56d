// hpchub-walltime: a JupyterLab 4 plugin in a hand-written federated-module container (no build step).
// It asks the server extension hpchub.walltime for the job's end, shows the time left when JupyterLab opens,
// and a warning at each of the hub's warning times (seconds before the end), through JupyterLab's own
// notifications (the apputils:notify command). It imports nothing from the share scope.
var _JUPYTERLAB;
(function () {
  "use strict";
  var POLL_MS = 30000;

  function minutes(seconds) {
    var m = Math.round(seconds / 60);
    return m === 1 ? "1 minute" : m + " minutes";
  }

  function notify(app, message, type) {
    return app.commands.execute("apputils:notify", {
      message: message,
      type: type,
      options: { autoClose: type === "info" ? 10000 : false }
    }).catch(function (err) { console.warn("hpchub-walltime: cannot notify", err); });
  }

  var plugin = {
    id: "hpchub-walltime:plugin",
    description: "Shows the batch job's remaining walltime and warns before it ends.",
    autoStart: true,
    activate: function (app) {
      var settings = app.serviceManager.serverSettings;
      var url = settings.baseUrl.replace(/\/?$/, "/") + "hpchub/walltime";
      var warned = {};
      var first = true;

      function check() {
        return settings.fetch(url, { credentials: "same-origin", cache: "no-store" })
          .then(function (response) { return response.ok ? response.json() : null; })
          .then(function (info) {
            if (!info || info.left_s === null || info.left_s === undefined) { return; }
            var left = info.left_s;
            var due = info.warnings_s.filter(function (w) { return left <= w && !warned[w]; });
            info.warnings_s.forEach(function (w) { if (left <= w) { warned[w] = true; } });
            var job = info.job_id ? "Job " + info.job_id : "This job";
            if (due.length) {
              notify(app, job + " ends in " + minutes(left) + " (walltime limit at " +
                     new Date(info.end).toLocaleTimeString() + "): save your work now.", "warning");
            } else if (first) {
              notify(app, job + " has " + minutes(left) + " of walltime left (until " +
                     new Date(info.end).toLocaleTimeString() + ").", "info");
            }
            first = false;
          })
          .catch(function (err) { console.warn("hpchub-walltime:", err); });
      }

      app.restored.then(function () {
        check();
        window.setInterval(check, POLL_MS);
      });
    }
  };

  _JUPYTERLAB = window._JUPYTERLAB = window._JUPYTERLAB || {};
  _JUPYTERLAB["hpchub-walltime"] = {
    get: function (module) {
      if (module !== "./extension" && module !== "./index") {
        return Promise.reject(new Error("hpchub-walltime has no module " + module));
      }
      return Promise.resolve(function () { return { __esModule: true, default: plugin }; });
    },
    init: function () { return Promise.resolve(); }
  };
})();
