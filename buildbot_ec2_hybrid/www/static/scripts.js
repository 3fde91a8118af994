// Loaded by Buildbot's web UI for every configured www plugin: adds an "EC2 pools" menu entry
// whose page frames plugins/ec2_hybrid/. Written by hand against the globals the UI exports to
// plugins (window.React, window.BuildbotPluginSupport), so the plugin needs no JS build step.
(function () {
  "use strict";
  var support = window.BuildbotPluginSupport;
  var React = window.React;
  if (!support || !support.buildbotSetupPlugin || !React) {
    return;
  }
  var h = React.createElement;

  function CloudIcon() {
    return h("svg", { viewBox: "0 0 24 24", width: "1em", height: "1em", fill: "currentColor",
                      "aria-hidden": "true" },
      h("path", { d: "M6.5 19a4.5 4.5 0 0 1-.6-8.96A6 6 0 0 1 17.6 8.5 5.25 5.25 0 0 1 17.25 19z" }));
  }

  function PoolPage() {
    return h("iframe", {
      src: "plugins/ec2_hybrid/",
      title: "EC2 overflow pools",
      className: "bb-ec2-hybrid-frame",
    });
  }

  support.buildbotSetupPlugin(function (reg) {
    reg.registerMenuGroup({
      name: "ec2_hybrid",
      caption: "EC2 pools",
      icon: h(CloudIcon),
      order: 25,
      route: "/ec2_hybrid",
      parentName: null,
    });
    reg.registerRoute({
      route: "/ec2_hybrid",
      group: "ec2_hybrid",
      element: function () { return h(PoolPage); },
    });
  });
})();
