// ESLint for the web page (batchexec/web/static): browser ES modules, no build step.
import js from "@eslint/js";
import globals from "globals";

export default [
  { ignores: ["node_modules/", ".venv/"] },
  js.configs.recommended,
  {
    files: ["batchexec/web/static/**/*.js"],
    languageOptions: {
      ecmaVersion: 2022,
      sourceType: "module",
      globals: globals.browser,
    },
    rules: {
      // The page must not build markup from strings: text goes in with textContent.
      "no-restricted-properties": [
        "error",
        { property: "innerHTML", message: "Set textContent, or build elements." },
        { property: "outerHTML", message: "Set textContent, or build elements." },
        { property: "insertAdjacentHTML", message: "Build elements instead." },
      ],
      "no-eval": "error",
      "no-implied-eval": "error",
      "no-new-func": "error",
      eqeqeq: ["error", "always", { null: "ignore" }],
      "prefer-const": "error",
      "no-var": "error",
    },
  },
  {
    files: ["eslint.config.js"],
    languageOptions: { sourceType: "module", globals: globals.node },
  },
];
